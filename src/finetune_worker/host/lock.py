"""One job per run at a time, across every worker that shares the volume.

The lock is a file holding who owns it, put in place whole: the owner record is
written to a private temporary file, which is then hard-linked to the lock's name
(link fails if the name exists: atomic on local and network filesystems, unlike
flock on many network volumes). A full volume therefore fails the write of the
temporary file, which is removed, and never leaves an empty lock behind. Where the
filesystem has no hard links, the lock is created with O_EXCL and written, and
removed again if the write fails.

The owner refreshes its heartbeat (the file's mtime) every few seconds. A lock is
stale when its owner's process is gone (same host), its heartbeat is older than
STALE_SECONDS (any host), or it is empty or unreadable and older than
PARTIAL_GRACE_SECONDS (a worker that died while writing it; the grace covers only
the O_EXCL fallback's moment between create and write). A stale lock is taken over
by renaming it away first, so that of two workers racing for it exactly one wins
the create.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from finetune_worker.contract import errors, events
from finetune_worker.contract.errors import JobError
from finetune_worker.host.rundir import RunPaths, move_aside, through_link

HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 60.0
PARTIAL_GRACE_SECONDS = 2.0
NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}


class RunLocked(Exception):
    def __init__(self, owner: dict):
        super().__init__("run is locked")
        self.owner = owner


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}  # empty or half-written (a worker died while writing it), or unreadable


def is_stale(owner: dict, heartbeat_age: float, host: str) -> bool:
    if heartbeat_age > STALE_SECONDS:
        return True
    if not owner.get("token"):  # no owner record: nobody will ever refresh or remove it
        return heartbeat_age > PARTIAL_GRACE_SECONDS
    if owner.get("host") == host and isinstance(owner.get("pid"), int):
        return not _pid_alive(owner["pid"])
    return False


def holder(path: Path) -> dict | None:
    """Who holds the lock at `path` now (its owner record), or None when it is free or
    stale. Only reads: never takes, renames or removes the lock."""
    owner = _read(path)
    if owner is None:
        return None
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    return None if is_stale(owner, age, socket.gethostname()) else owner


class RunLock:
    def __init__(self, path: Path, job_id: str = ""):
        self.path = path
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex
        self.owner = {"host": self.host, "pid": os.getpid(), "job_id": job_id, "token": self.token, "since": time.time()}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.took_over: dict | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunLocked with the current owner."""
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            owner = _read(self.path)
            if owner is None:
                continue  # released meanwhile: try again
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                continue
            if not is_stale(owner, age, self.host):
                raise RunLocked(owner)
            aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue  # another worker took it over first; compete for the create
            self.took_over = owner
            aside.unlink(missing_ok=True)
        owner = _read(self.path) or {}
        raise RunLocked(owner)

    def _create(self) -> bool:
        """Put the lock in place with its owner record, whole, or not at all (False: it exists)."""
        temporary = self.path.with_name(f"{self.path.name}.new-{self.token}")
        try:
            _write_new(temporary, self.owner)
            os.link(temporary, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in NO_HARD_LINKS:
                raise
        finally:
            temporary.unlink(missing_ok=True)
        try:
            _write_new(self.path, self.owner)  # no hard links here: O_EXCL, removed if the write fails
        except FileExistsError:
            return False
        return True

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_SECONDS):
                try:
                    os.utime(self.path)
                except FileNotFoundError:
                    return

        self._beat = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        if (_read(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)


def _write_new(path: Path, owner: dict) -> None:
    """Create `path` (O_EXCL) holding the owner record; on any failure, remove it again."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(owner, handle)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def take_run(paths: RunPaths, user_id: str, run_id: str, restart: bool) -> tuple[RunLock, list[dict]]:
    """Lock the run (one job per run on the whole volume), never through a symbolic link;
    move an old attempt aside on restart. (The lock, what to report.)"""
    if through_link(paths.run_dir):
        raise JobError(errors.INVALID_INPUT, f"run {run_id!r}: its directory on the volume is a symbolic link, "
                                             "which the worker never follows; use another run_id (the operator can remove the link)")
    paths.run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = RunLock(paths.lock_file, job_id=run_id)
    try:
        lock.acquire()
    except RunLocked as exc:
        owner = exc.owner
        where = f" (worker {owner.get('host', '?')}, pid {owner.get('pid', '?')})" if owner else ""
        raise JobError(errors.RUN_IN_PROGRESS, f"run {user_id}/{run_id} is already running{where}; wait for it or use another run_id") from None
    found = []
    if lock.took_over:
        found.append(events.warning(f"took over the lock of a worker that stopped ({lock.took_over.get('host', '?')}, pid {lock.took_over.get('pid', '?')})"))
    if restart and (moved := move_aside(paths.run_dir)):
        found.append(events.status("preparing", f"restart: the earlier attempt was kept as {moved.name}"))
    return lock, found
