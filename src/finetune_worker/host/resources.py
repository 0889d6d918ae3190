"""What a job holds while it runs and gives back however it ends: its redactor, the
run's lock, its child processes, the deadlines they end by, and its scratch files.

What the job's stages learn (the valid job, the plan, the run's paths, ...) is the
`JobRun` (run/job.py); no field is in both.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from finetune_worker.contract import errors, events
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import CHILD_DEADLINES, WorkerSettings
from finetune_worker.host.children import ChildProcess, Deadline, sooner
from finetune_worker.host.lock import RunLock
from finetune_worker.host.redact import Redactor
from finetune_worker.host.rundir import append_event


@dataclass
class JobResources:
    """The live side of a job: what must be stopped, released or removed when it ends."""

    redactor: Redactor = field(default_factory=Redactor)
    lock: RunLock | None = None
    events_file: Path | None = None  # once the run is locked: where its events are recorded
    child: ChildProcess | None = None  # the child running now (training or a helper)
    standby: ChildProcess | None = None  # a training child importing Axolotl while the checks run
    preflight_standby: ChildProcess | None = None  # the same for the preflight child (modes preflight and estimate)
    background: list[ChildProcess] = field(default_factory=list)  # uploads of checkpoints while training goes on
    step_cancel: threading.Event | None = None  # set to stop the blocking step running in a thread
    ended: bool = False
    job_deadline: Deadline | None = None  # FINETUNE_MAX_HOURS, from the job's start: every child ends by it
    child_limits: Mapping[str, tuple[float, str]] = field(default_factory=dict)  # each helper child's own limit
    scratch: list[Path] = field(default_factory=list)  # files removed however the job ends (a generate spec)

    def start_clock(self, settings: WorkerSettings, started: float) -> None:
        """The job's own deadline, counted from `started` (time.monotonic()), and each child's limit."""
        if settings.max_hours:
            self.job_deadline = Deadline(started + 3600 * settings.max_hours,
                                         f"FINETUNE_MAX_HOURS={settings.max_hours:g} h for the whole job, counted from its start")
        self.child_limits = {name: settings.child_deadline(name) for name in CHILD_DEADLINES}

    def deadline(self, child: str) -> Deadline | None:
        """When the helper child `child` (its log's name; "training" has no limit of its own)
        must end: its own limit from now, or the job's deadline if that comes first."""
        own = self.child_limits.get(child)
        return sooner(Deadline.after(own[0], f"{own[1]}={own[0]:g} s") if own else None, self.job_deadline)

    def check_deadline(self) -> None:
        """Between stages: a job past FINETUNE_MAX_HOURS starts nothing more."""
        if self.job_deadline is not None and self.job_deadline.passed:
            raise self.job_deadline.error("the job")

    def remove_scratch(self) -> None:
        for path in self.scratch:
            path.unlink(missing_ok=True)
        self.scratch.clear()

    def on_task_done(self, task: asyncio.Task) -> None:
        """Stop the training and free the run when the job's task ends, however it ends.

        A cancel (RunPod's /cancel or timeout, Ctrl-C) often lands while this
        generator is suspended at a `yield` and the SDK is awaiting something else;
        the generator is then never resumed or closed, so its `finally` cannot be
        relied on. The task's done-callback always runs.
        """
        self.stop_children()
        self.remove_scratch()
        if task.cancelled() and not self.ended and self.events_file and self.events_file.parent.is_dir():
            append_event(self.events_file, events.error(JobError(errors.CANCELLED, "the job was cancelled")))
            self.ended = True
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def stop_children(self) -> None:
        if self.step_cancel is not None:
            self.step_cancel.set()
        for child in (self.child, self.standby, self.preflight_standby, *self.background):
            if child is not None:
                child.stop()

    async def reap_children(self) -> None:
        for child in (self.child, self.standby, self.preflight_standby, *self.background):
            if child is not None:
                await child.reap()
