"""A job's budget (sizing/budget.py) kept: before training, against the estimate for this
worker; during training, against the measured pace. Over it before: `budget_exceeded`,
nothing downloaded; during: the training is asked to stop at its next checkpoint (the
progress plugin saves it and exits), which a resubmission with a larger budget goes on from.

Every training also shows the time and cost table as it begins, from the lengths of the
train split the training child prepared (no tokenizing of its own): `table_at_start`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from finetune_worker.contract import errors, events
from finetune_worker.contract.errors import JobError
from finetune_worker.data.estimate import job_estimate
from finetune_worker.data.stage import describe_choice, tokenize_as_training_would
from finetune_worker.host.resources import JobResources
from finetune_worker.run.job import JobRun
from finetune_worker.run.progress import ProgressTracker
from finetune_worker.sizing.budget import estimate_row_for

ESTIMATE_DETAILS = ("gpu", "count", "memory_gib", "train_seconds", "total_seconds", "cost_usd", "phases_seconds", "steps", "from")


async def check_estimate(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """The estimate's row for this worker against the budget. The preflight's tokenization
    saves the prepared data that the training then loads instead of tokenizing again."""
    budget, hardware = run.budget, run.hardware
    where = hardware.describe() + (f" on each of {run.cluster.nodes} nodes" if run.cluster is not None else "")
    if not hardware.has_gpu:
        yield events.status("preparing", f"budget: {budget.said}; a CPU worker has no row in the estimate, so the measured pace "
                            "is checked against it during training")
        return
    yield events.status("preparing", f"budget: {budget.said}; tokenizing the datasets to estimate this job on {where}")
    started = time.monotonic()
    report = await tokenize_as_training_would(run.plan.config, run.paths, run.child_env, resources, run.checks)
    on_this_worker = run.settings.model_copy(update={"gpu_types": (hardware.gpu_names[0],)})
    table = job_estimate(run.plan.config, run.job.model_copy(update={"num_processes": run.world_size}), run.base, report,
                         on_this_worker, time.monotonic() - started, run.plan.publish)
    row = estimate_row_for(table, hardware, run.world_size)
    if row is None or row.get("total_seconds") is None:
        why = (row or table).get("reason", "its GPU type is not in the table")
        yield events.warning(f"budget: no estimate for {where} ({why}); the measured pace is checked against it during training")
        return
    if overrun := budget.overrun(row["total_seconds"]):
        raise JobError(errors.BUDGET_EXCEEDED, f"the estimate for this job on {where} is {overrun}; nothing was "
                       "downloaded or trained: raise the budget, or train less (max_steps, num_epochs, a smaller dataset)",
                       [f"{name}: {value}" for name, value in row.items() if name in ESTIMATE_DETAILS])
    run.estimate_row = row
    cost = budget.cost(row["total_seconds"])
    yield events.status("preparing", f"budget: estimated {row['total_seconds'] / 3600:.3g} h on {where}"
                        + (f", ${cost:.4g}" if cost is not None else "") + f", within {budget.said}", estimate=row)


def pace_overrun(run: JobRun, tracker: ProgressTracker) -> dict | None:
    """Once the pace is known: if the job's time so far plus the training's ETA breaks its
    budget, ask the training to stop at its next checkpoint (once), and say why."""
    eta = tracker.eta()
    if run.budget is None or eta is None or run.paths.stop_file.exists():
        return None
    overrun = run.budget.overrun(time.monotonic() - run.started + eta)
    if overrun is None:
        return None
    said = f"at the measured pace (step {tracker.step} of {tracker.max_steps}) this job would take {overrun}"
    run.paths.stop_file.write_text(said, encoding="utf-8")
    return events.warning(f"{said}: stopping at a checkpoint at the next step")


def table_at_start(run: JobRun, tracker: ProgressTracker) -> list[dict]:
    """The time and cost table for each GPU type and count, from the lengths of the train split
    the training child prepared (its `lengths` record, before the first step); on a GPU worker
    its own row is what the result and the model card compare the measurements with."""
    if run.secondary or run.base is None or tracker.lengths is None:
        return []
    job = run.job.model_copy(update={"num_processes": run.world_size}) if run.cluster is not None else run.job
    table = job_estimate(run.estimate_config or run.plan.config, job, run.base, {"train": tracker.lengths, "eval": tracker.eval_lengths}, run.settings,
                         tracker.phases().get("tokenize", 0.0), run.plan.publish)
    row = estimate_row_for(table, run.hardware, run.world_size)
    if run.estimate_row is None and row is not None and row.get("total_seconds") is not None:
        run.estimate_row = row
    here = (f"; on this worker ({run.hardware.describe()}): {row['train_seconds']:g} s of training" if row and row.get("train_seconds") is not None
            else "" if run.hardware.has_gpu else "; a CPU worker has no row")
    return [events.status("training", describe_choice(table) + here, estimate=table)]
