"""What a job's stages share: its context (after validation) and its live state."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

from finetune_worker.checks.validation import ValidJob
from finetune_worker.contract import errors, events
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import WorkerSettings
from finetune_worker.plan.config import AxolotlPlan
from finetune_worker.run.children import ChildProcess, Deadline, sooner
from finetune_worker.run.lock import RunLock
from finetune_worker.run.redact import Redactor
from finetune_worker.run.rundir import RunPaths, append_event


@dataclass
class JobState:
    """What outlives the generator: the run's paths, its lock and its child processes."""

    redactor: Redactor = field(default_factory=Redactor)
    paths: RunPaths | None = None
    lock: RunLock | None = None
    training: ChildProcess | None = None  # the child running now (training or a helper)
    standby: ChildProcess | None = None  # a training child importing Axolotl while the checks run
    step_cancel: threading.Event | None = None  # set to stop the blocking step running in a thread
    ended: bool = False
    settings: WorkerSettings | None = None
    job_deadline: Deadline | None = None  # FINETUNE_MAX_HOURS, from the job's start: every child ends by it
    scratch: list[Path] = field(default_factory=list)  # files removed however the job ends (a generate spec)

    def start_clock(self, settings: WorkerSettings, started: float) -> None:
        """The job's own deadline, counted from `started` (time.monotonic())."""
        self.settings = settings
        if settings.max_hours:
            self.job_deadline = Deadline(started + 3600 * settings.max_hours,
                                         f"FINETUNE_MAX_HOURS={settings.max_hours:g} h for the whole job, counted from its start")

    def deadline(self, child: str) -> Deadline | None:
        """When the helper child `child` (its log's name; "training" has no limit of its own)
        must end: its own limit from now, or the job's deadline if that comes first."""
        own = self.settings.child_deadline(child) if self.settings else None
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
        if task.cancelled() and not self.ended and self.paths and self.paths.run_dir.is_dir():
            append_event(self.paths, events.error(JobError(errors.CANCELLED, "the job was cancelled")))
            self.ended = True
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def stop_children(self) -> None:
        if self.step_cancel is not None:
            self.step_cancel.set()
        for child in (self.training, self.standby):
            if child is not None:
                child.stop()

    async def reap_children(self) -> None:
        for child in (self.training, self.standby):
            if child is not None:
                await child.reap()


@dataclass(frozen=True)
class JobContext:
    """Everything the stages after validation share; the plan is complete (fast defaults,
    prepared-data path and resume point are in it) before config.yaml is written."""

    valid: ValidJob
    plan: AxolotlPlan
    paths: RunPaths
    settings: WorkerSettings
    child_env: dict[str, str]
    num_processes: int = 1

    @property
    def repo_id(self) -> str | None:
        return self.plan.publish.get("hub_model_id")
