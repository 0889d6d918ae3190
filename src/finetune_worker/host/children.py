"""The child processes of a job (training and helpers): start one, follow it, stop it completely.

The child runs in its own process group (session), so a cancel or a worker
shutdown can end the whole tree (accelerate launchers and their ranks included),
and it dies with the worker (PR_SET_PDEATHSIG). Its output passes through the
worker, line by line, so every line is redacted before it reaches the run log.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.host.redact import Redactor

POLL_SECONDS = 0.25
TAIL_LINES = 40
STOP_GRACE_SECONDS = 5.0
PR_SET_PDEATHSIG = 1

# Process groups of running trainings, so a worker shutdown can end them all.
LIVE_PROCESS_GROUPS: set[int] = set()
_SHUTDOWN = threading.Event()


def die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ... ; comm may contain spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def stop_process_group(pgid: int, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM the whole group, then SIGKILL whatever is left after `grace` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        LIVE_PROCESS_GROUPS.discard(pgid)
        return
    deadline = time.monotonic() + grace
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_members(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    LIVE_PROCESS_GROUPS.discard(pgid)


def told_to_go(started: float) -> bool:
    """In a standby child: wait for the worker's "go" on stdin (end of input: the job needs
    no such step). Stdin is then the null device, as for a child started without standby.
    `started`: when the child started (time.monotonic()); the log says how long its imports
    took and how long it then waited, which of the two a job's start waited for."""
    import sys

    ready = time.monotonic()
    print(f"standby: ready after {ready - started:.1f} s of imports; waiting for go", file=sys.stderr, flush=True)
    go = sys.stdin.readline().strip() == "go"
    if go:
        print(f"standby: go after {time.monotonic() - ready:.1f} s of waiting", file=sys.stderr, flush=True)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return go


def request_shutdown() -> None:
    """The worker is going away: stop every training (their jobs end `cancelled`)."""
    _SHUTDOWN.set()
    for pgid in list(LIVE_PROCESS_GROUPS):
        stop_process_group(pgid)


def shutdown_requested() -> bool:
    return _SHUTDOWN.is_set()


@dataclass(frozen=True)
class Deadline:
    """When a child must have ended (time.monotonic()), and the limit that set it, as the error names it."""

    at: float
    limit: str  # "FINETUNE_PREFLIGHT_DEADLINE_S=1800 s", "FINETUNE_MAX_HOURS=2 h for the whole job"

    @classmethod
    def after(cls, seconds: float, limit: str) -> Deadline:
        return cls(time.monotonic() + seconds, limit)

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def error(self, what: str, log_tail: list[str] | None = None) -> JobError:
        return JobError(errors.DEADLINE_EXCEEDED, f"{what} was stopped at its deadline ({self.limit}, this worker's limit)",
                        log_tail=log_tail or [])


def sooner(*deadlines: Deadline | None) -> Deadline | None:
    """The first of these deadlines (None: none at all)."""
    found = [deadline for deadline in deadlines if deadline is not None]
    return min(found, key=lambda deadline: deadline.at) if found else None


class JsonLinesTail:
    """Reads the complete lines appended to a file since the last read."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records


class ChildProcess:
    """One child process of a job (training, or a helper: Hub steps, merge, preflight,
    evaluation, generate): started in its own process group, its output redacted into
    its log, and stopped at its deadline: `records()` then ends with deadline_exceeded."""

    def __init__(self, argv: list[str], env: dict[str, str], log_file: Path, progress_file: Path, redactor: Redactor,
                 deadline: Deadline | None = None, what: str = "the child process"):
        self.deadline = deadline
        self.what = what  # in the deadline's error: "the preflight", "the training"
        self._standby_expiry: asyncio.TimerHandle | None = None
        self.argv = argv
        self.env = env
        self.log_file = log_file
        self.progress = JsonLinesTail(progress_file)
        self.redactor = redactor
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task | None = None
        self.log_failed = False
        self.timed_out = False  # stopped at its deadline

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, standby: bool = False) -> None:
        """Start the process. A standby child (finetune_worker.run.standby) only imports
        until `go`; its output waits in the pipe, and the run directory need not exist yet.
        A deadline already past starts nothing; a standby not told to go by its deadline is killed."""
        if self.deadline is not None and self.deadline.passed:
            self.timed_out = True
            raise self.deadline.error(self.what)
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE if standby else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            # the run directory: no relative path means anything else
            cwd=None if standby else self.log_file.parent,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        LIVE_PROCESS_GROUPS.add(self.process.pid)
        if not standby:
            self._follow()
        elif self.deadline is not None:
            self._standby_expiry = asyncio.get_running_loop().call_later(max(0.0, self.deadline.at - time.monotonic()), self._expire)

    def _expire(self) -> None:
        """A standby still waiting for its go at its deadline: it only imported, so it is killed at once."""
        if self.on_standby:
            self.timed_out = True
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def go(self) -> None:
        """Let a standby child train (its config is written by now)."""
        assert self.process and self.process.stdin
        try:
            self.process.stdin.write(b"go\n")
            await self.process.stdin.drain()
            self.process.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died while importing: its output says why, and records() ends at once
        self._follow(" (on standby, importing Axolotl, since the job arrived)")

    @property
    def label(self) -> str:
        """Its log's banner: "training process", "preflight process", "LoRA merge process"."""
        name = self.what.removeprefix("the ")
        return name if name.endswith("process") else f"{name} process"

    @property
    def on_standby(self) -> bool:
        """Started as a standby, not yet told to go, and still running."""
        return self.process is not None and self.process.returncode is None and self._pump is None

    def _follow(self, note: str = "") -> None:
        if self._standby_expiry is not None:
            self._standby_expiry.cancel()
        self.progress.offset = self.progress.path.stat().st_size if self.progress.path.exists() else 0
        self._pump = asyncio.create_task(self._pump_output(note))

    async def _pump_output(self, note: str) -> None:
        assert self.process and self.process.stdout
        pending = b""
        # Unbuffered: a full volume fails a write here and there, never the close.
        with open(self.log_file, "ab", buffering=0) as log:
            self._write_lines(log, [f"===== {self.label} {self.process.pid} started{note} {time.strftime('%Y-%m-%d %H:%M:%S %Z')} =====".encode()])
            while chunk := await self.process.stdout.read(65536):
                lines = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
                pending = lines.pop()
                self._write_lines(log, lines)
            if pending:
                self._write_lines(log, [pending])

    def _write_lines(self, log, lines: list[bytes]) -> None:
        for raw in lines:
            line = self.redactor.text(raw.decode("utf-8", errors="replace")).rstrip()
            if not line:
                continue
            self.tail.append(line)
            if not self.log_failed:
                try:
                    log.write((line + "\n").encode())
                except OSError:  # a full volume: keep the tail in memory, keep draining the pipe
                    self.log_failed = True

    async def records(self) -> AsyncIterator[list[dict]]:
        """Batches of progress records, until the process exits and its output is drained.
        Past its deadline the process tree is stopped, `timed_out` set, and the records
        end with the deadline's JobError (deadline_exceeded, naming the limit)."""
        assert self.process
        while self.process.returncode is None:
            if self.deadline is not None and self.deadline.passed and not self.timed_out:
                self.timed_out = True
                await asyncio.to_thread(stop_process_group, self.process.pid)
            try:
                await asyncio.wait_for(asyncio.shield(self.process.wait()), POLL_SECONDS)
            except TimeoutError:
                pass
            batch = self.progress.read_new()
            if batch:
                yield batch
        if self._pump:
            await self._pump
        # Ranks or helpers the child left behind must not keep holding the GPU.
        if group_members(self.process.pid):
            stop_process_group(self.process.pid, grace=1.0)
        LIVE_PROCESS_GROUPS.discard(self.process.pid)
        batch = self.progress.read_new()
        if batch:
            yield batch
        if self.timed_out and self.deadline is not None:
            raise self.deadline.error(self.what, self.log_tail())

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    def log_tail(self) -> list[str]:
        return list(self.tail)

    def stop(self) -> None:
        """End the whole process tree now (used on cancel and shutdown)."""
        if self._standby_expiry is not None:
            self._standby_expiry.cancel()
        if self.process and self.process.pid in LIVE_PROCESS_GROUPS:
            stop_process_group(self.process.pid)
        if self.process and self.process.stdin and not self.process.stdin.is_closing():
            self.process.stdin.close()  # a standby that was never told to go
        if self._pump and not self._pump.done():
            self._pump.cancel()

    async def reap(self) -> None:
        """Wait until a stopped process is collected, so its pipes close with the event loop still running."""
        if self.process and self.process.returncode is None and self.process.pid not in LIVE_PROCESS_GROUPS:
            await self.process.wait()
