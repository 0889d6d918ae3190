"""What a job's stages share: its context (after validation) and its live state."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from finetune_worker.checks.validation import ValidJob
from finetune_worker.contract import errors, events
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import WorkerSettings
from finetune_worker.plan.config import AxolotlPlan
from finetune_worker.run.children import ChildProcess
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

    def on_task_done(self, task: asyncio.Task) -> None:
        """Stop the training and free the run when the job's task ends, however it ends.

        A cancel (RunPod's /cancel or timeout, Ctrl-C) often lands while this
        generator is suspended at a `yield` and the SDK is awaiting something else;
        the generator is then never resumed or closed, so its `finally` cannot be
        relied on. The task's done-callback always runs.
        """
        self.stop_children()
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
