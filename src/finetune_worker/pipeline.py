"""One job, top to bottom: validate -> plan -> prepare run dir -> train -> result.

`run_job` is the async generator every entry point drives (RunPod's handler, the
local CLI, the tests). Every event it yields has passed the redactor and has been
appended to the run's events.jsonl.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import traceback
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import axolotl_schema, errors, events
from .errors import JobError
from .events import ProgressTracker
from .failures import diagnose
from .hardware import Hardware, detect_hardware
from .plan import AxolotlPlan, RunPaths, build_axolotl_config, build_child_env, build_train_argv, run_paths
from .redact import Redactor, secrets_in_env, secrets_in_raw_input
from .rundir import append_event, prepare_run_dir, write_config, write_json
from .settings import WorkerSettings
from .training import TrainingProcess, shutdown_requested
from .validation import ValidJob, config_problems_error, validate_job

LOG = logging.getLogger("finetune_worker")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class JobState:
    """What the outer wrapper needs to know about the job as it goes."""

    paths: RunPaths | None = None
    training: TrainingProcess | None = None
    ended: bool = False

    def on_task_done(self, task: asyncio.Task) -> None:
        """Stop the training when the job's task ends, however it ends.

        A cancel (RunPod's /cancel or timeout, Ctrl-C) often lands while this
        generator is suspended at a `yield` and the SDK is awaiting something else;
        the generator is then never resumed or closed, so its `finally` cannot be
        relied on. The task's done-callback always runs.
        """
        if self.training is not None:
            self.training.stop()
        if task.cancelled() and not self.ended and self.paths:
            append_event(self.paths, events.error(JobError(errors.CANCELLED, "the job was cancelled")))
            self.ended = True


async def run_job(
    raw_input: Any,
    env: Mapping[str, str] | None = None,
    hardware: Hardware | None = None,
) -> AsyncIterator[dict]:
    env = dict(os.environ if env is None else env)
    redactor = Redactor(secrets_in_raw_input(raw_input) + secrets_in_env(env))
    state = JobState()
    task = asyncio.current_task()
    if task is not None:
        task.add_done_callback(state.on_task_done)
    early: list[dict] = []  # events from before the run directory exists
    async for event in _pipeline(raw_input, env, hardware, state):
        event = redactor.value(event)
        if state.paths:
            for pending in [*early, event]:
                append_event(state.paths, pending)
            early.clear()
        else:
            early.append(event)
        state.ended = event["type"] in ("result", "error")
        yield event


async def _pipeline(raw_input: Any, env: dict[str, str], hardware: Hardware | None, state: JobState) -> AsyncIterator[dict]:
    started = time.monotonic()
    training: TrainingProcess | None = None
    yield events.status("validating", "checking the job input and the Axolotl config")
    try:
        settings = WorkerSettings.from_env(env)
        hardware = hardware or detect_hardware()
        valid = validate_job(raw_input, settings, hardware)
        paths = run_paths(settings.runs_dir, valid.job.user_id, valid.job.run_id)
        plan = build_axolotl_config(valid.args, paths, settings.cache_dir / "prepared", hardware)
        final_problems = axolotl_schema.schema_problems(plan.config, tuple(plan.config["plugins"][:-1]))
        if final_problems:
            raise config_problems_error(final_problems)
        for message in plan.warnings:
            yield events.warning(message)

        prepare_run_dir(paths)
        state.paths = paths
        write_config(paths, plan.config)
        write_json(paths.job_file, _job_record(valid))
        yield events.status("preparing", f"run directory {paths.run_dir} on {hardware.describe()}", run_dir=str(paths.run_dir))

        training = _training_process(valid, plan, paths, settings, env, Redactor(_job_secrets(valid, settings)))
        state.training = training
        await training.start()
        tracker = ProgressTracker()
        async for batch in training.records():
            for record in batch:
                for event in tracker.feed(record):
                    yield event
            if progress := tracker.progress_due():
                yield progress
        if progress := tracker.progress_due(force=True):
            yield progress
        _raise_unless_trained(training, tracker)

        metrics = {**tracker.metrics, "total_steps": tracker.max_steps}
        result = events.result(valid.job.run_id, str(paths.output_dir), metrics, time.monotonic() - started)
        write_json(paths.result_file, result)
        yield result
    except JobError as exc:
        if training is not None and not exc.log_tail:
            exc.log_tail = training.log_tail()
        yield events.error(exc)
    except Exception as exc:  # a worker bug: say so without leaking internals to the client
        LOG.error("unexpected error: %s", traceback.format_exc())
        yield events.error(JobError(errors.INTERNAL_ERROR, f"the worker hit an unexpected {type(exc).__name__}; see the worker log"))
    finally:
        if training is not None:
            training.stop()


def _job_secrets(valid: ValidJob, settings: WorkerSettings) -> list[str]:
    creds = valid.job.credentials
    values = [creds.hf_token, creds.wandb_api_key, settings.hf_token, settings.wandb_api_key]
    return [v.get_secret_value() for v in values if v is not None]


def _secret(job_value, worker_value) -> str | None:
    chosen = job_value or worker_value
    return chosen.get_secret_value() if chosen else None


def _training_process(
    valid: ValidJob, plan: AxolotlPlan, paths: RunPaths, settings: WorkerSettings, env: Mapping[str, str], redactor: Redactor
) -> TrainingProcess:
    creds = valid.job.credentials
    child_env = build_child_env(
        env,
        paths=paths,
        cache_dir=settings.cache_dir,
        package_root=PACKAGE_ROOT,
        hf_token=_secret(creds.hf_token, settings.hf_token),
        wandb_api_key=_secret(creds.wandb_api_key, settings.wandb_api_key),
    )
    argv = build_train_argv(sys.executable, paths.config_file)
    return TrainingProcess(argv, child_env, paths.log_file, paths.progress_file, redactor)


def _job_record(valid: ValidJob) -> dict:
    creds = valid.job.credentials
    return {
        **valid.job.model_dump(exclude={"credentials", "args"}),
        "credentials_given": {"hf_token": creds.hf_token is not None, "wandb_api_key": creds.wandb_api_key is not None},
        "args": valid.job.args,
    }


def _raise_unless_trained(training: TrainingProcess, tracker: ProgressTracker) -> None:
    """Only a training that ran to its end, saved its model and kept a finite loss counts."""
    finished = training.returncode == 0 and tracker.saw_train_end and tracker.saw_saved
    if finished and tracker.nan_step is None:
        return
    if shutdown_requested():
        raise JobError(errors.CANCELLED, "the worker is shutting down and stopped the training; resubmit the same run_id to resume")
    diagnosis = diagnose(training.returncode, training.log_tail(), tracker.stage, tracker.nan_step)
    if training.returncode == 0 and diagnosis.code == errors.TRAINING_FAILED:
        diagnosis = diagnosis.__class__(errors.TRAINING_FAILED, "the training process exited before training finished; see log_tail")
    raise JobError(diagnosis.code, diagnosis.message, log_tail=training.log_tail())
