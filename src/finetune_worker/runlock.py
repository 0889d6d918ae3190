"""One job per run at a time, across every worker that shares the volume.

The lock is a file created with O_EXCL (atomic on local and network filesystems,
unlike flock on many network volumes), holding who owns it. The owner refreshes
its heartbeat (the file's mtime) every few seconds. A lock is stale when its
owner's process is gone (same host) or its heartbeat is older than STALE_SECONDS
(any host); a stale lock is taken over by renaming it away first, so that of two
workers racing for it exactly one wins the O_EXCL create.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 60.0


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
    except ValueError:
        return {}  # half-written by a dying owner: judged by its age alone


def is_stale(owner: dict, heartbeat_age: float, host: str) -> bool:
    if heartbeat_age > STALE_SECONDS:
        return True
    if owner.get("host") == host and isinstance(owner.get("pid"), int):
        return not _pid_alive(owner["pid"])
    return False


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
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.owner, handle)
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
