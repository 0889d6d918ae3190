"""The training stage: `axolotl train` in a child, its progress records turned into events.

A standby child may already be importing Axolotl (started before validation, so the
imports overlap the checks); it trains on `go`, and is stopped if the job ends first.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

from finetune_worker.checks.distributed import process_count
from finetune_worker.checks.options import AXOLOTL_KEPT_CHECKPOINTS
from finetune_worker.contract import errors, events
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.job import JobInput
from finetune_worker.host.children import ChildProcess, shutdown_requested, stop_process_group
from finetune_worker.host.failures import diagnose
from finetune_worker.host.hardware import Hardware
from finetune_worker.host.resources import JobResources
from finetune_worker.host.rundir import RunPaths, json_digest, set_aside_diverged
from finetune_worker.host.tools import free_port, job_child
from finetune_worker.plan.children import build_standby_argv, build_train_argv
from finetune_worker.run import cluster as cluster_node
from finetune_worker.run.budget import pace_overrun, table_at_start
from finetune_worker.run.job import JobRun
from finetune_worker.run.progress import ProgressTracker
from finetune_worker.run.storage import CheckpointUploads
from finetune_worker.sizing.budget import worker_price
from finetune_worker.sizing.measured import STORE_NAME, training_measured
from finetune_worker.sizing.measured import record as record_measurement
from finetune_worker.sizing.resources import gib

ETA_WARNING_SECONDS = 24 * 3600  # a training whose ETA is beyond this (or FINETUNE_MAX_HOURS) is warned about once


def progress_tracker(max_hours: float | None) -> ProgressTracker:
    return ProgressTracker(eta_warning_seconds=min(ETA_WARNING_SECONDS, 3600 * (max_hours or float("inf"))))


async def start_standby(job: JobInput, paths: RunPaths, child_env: dict[str, str], hardware: Hardware, resources: JobResources,
                        cluster: bool = False) -> None:
    """Start the training child now, so Axolotl's imports overlap the checks, the data
    step and the Hub check; it trains only on `go`, and is stopped if the job ends first."""
    if job.mode != "train" or process_count(job.num_processes, hardware.gpu_count) > 1 or cluster:
        return
    if not job.restart and (paths.result_file.exists() or paths.trained_file.exists()):
        return  # nothing left to train
    standby = job_child(build_standby_argv(sys.executable, paths.config_file), child_env, paths.log_file, paths.progress_file, "training", resources)
    await standby.start(standby=True)  # killed at the job's deadline if it never gets its go
    resources.standby = standby


async def _training_child(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """The standby child when it is waiting, else a new one (under accelerate for several processes)."""
    paths = run.paths
    standby, resources.standby = resources.standby, None
    if standby is not None and standby.on_standby:
        resources.child = standby
        await standby.go()
        return
    if standby is not None:
        standby.stop()
    if run.cluster is not None:
        argv, env = _cluster_launch(run)
        yield events.status("training", f"joining the cluster: {run.cluster.describe()}, rendezvous at {run.cluster.endpoint} "
                            f"({'this node is node 0: events and the result come from here' if run.cluster.primary else f'node {run.cluster.node_rank}: it logs here, node 0 reports'})",
                            cluster={**run.cluster.record(), "shared_volume": run.settings.shared_volume})
        resources.child = job_child(argv, env, paths.log_file, paths.progress_file, "training", resources)
        await resources.child.start()
        return
    if run.processes > 1:
        argv = build_train_argv(sys.executable, paths.config_file, run.processes, free_port())
        yield events.status("training", f"launching {run.processes} training processes with accelerate (events come from rank 0)", num_processes=run.processes)
    else:
        argv = build_train_argv(sys.executable, paths.config_file)
    resources.child = job_child(argv, run.child_env, paths.log_file, paths.progress_file, "training", resources)
    await resources.child.start()


def _cluster_launch(run: JobRun, train: bool = True) -> tuple[list[str], dict[str, str]]:
    settings, record = run.settings, run.valid.record()
    return cluster_node.prepare_launch(
        run.cluster, cluster_node.NodeFiles.of_run(run.paths), job_sha256=json_digest(record),
        config_sha256=cluster_node.config_digest(run.plan.config, run.paths, settings.cache_dir), shared_volume=settings.shared_volume,
        timeout_s=cluster_timeout(run), join_timeout_s=settings.cluster_join_timeout_s, child_env=run.child_env, train=train,
    )


async def release_cluster(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """Node 0 of a run trained earlier: join the relaunched nodes once, so that they end at
    once (`completed`) instead of waiting for a training that will not come."""
    yield events.status("training", f"telling the other {run.cluster.nodes - 1} node(s) that this run is trained already "
                        f"(they have {run.settings.cluster_join_timeout_s} s to join at {run.cluster.endpoint})")
    argv, env = _cluster_launch(run, train=False)
    resources.child = job_child(argv, env, run.paths.log_file, run.paths.progress_file, "training", resources)
    await resources.child.start()
    async for _ in resources.child.records():
        pass
    if resources.child.returncode != 0:
        yield events.warning("the other nodes did not all join; any still waiting end with rendezvous_timeout")


def cluster_timeout(run: JobRun) -> int:
    return cluster_node.process_group_timeout(run.settings.cluster_timeout_s, run.plan.config)


def _cluster_events(run: JobRun, records: list[dict]) -> list[dict]:
    """The node's new status records as events (joined: where training resumes)."""
    found = []
    for record in records:
        if record.get("kind") == "nothing_to_train":
            found.append(events.status("training", "node 0 holds this run's finished training: nothing to train on this node"))
        if record.get("kind") == "joined":
            step = record.get("resume_step")
            found.append(events.status("training", f"all {run.cluster.nodes} nodes joined (world size {record.get('world_size')})"
                                       + (f"; resuming from step {step} (checkpoint-{step}, complete on every node)" if step else
                                          "; training from the start"), **({"resumed_from_step": step} if step else {})))
    return found


async def train(run: JobRun, resources: JobResources, tracker: ProgressTracker) -> AsyncIterator[dict]:
    """Run `axolotl train` in a child process and turn its progress records into events (and,
    with a bucket, upload each checkpoint while the training goes on: run/storage.py)."""
    run.paths.stop_file.unlink(missing_ok=True)  # an earlier attempt's request to stop
    if run.bucket is not None and not run.secondary:  # node 0 keeps the run's copy
        keep = run.plan.config.get("save_total_limit") or AXOLOTL_KEPT_CHECKPOINTS  # as many as the volume keeps
        run.uploads = CheckpointUploads(run.bucket, run.paths.output_dir, keep, resources)
    async for event in _training_child(run, resources):
        yield event
    training, settings = resources.child, run.settings
    over_steps = None
    status = cluster_node.NodeStatus(cluster_node.NodeFiles.of_run(run.paths)) if run.cluster is not None else None
    try:
        async for batch in training.records():
            if status is not None:
                for event in _cluster_events(run, status.read_new()):
                    yield event
            for record in batch:
                for event in tracker.feed(record):
                    if event["type"] == "checkpoint" and run.uploads is not None:
                        run.uploads.start(event["step"])
                    yield event
                if record.get("kind") == "lengths":
                    for event in table_at_start(run, tracker):
                        yield event
            for event in run.uploads.finished() if run.uploads is not None else ():
                yield event
            if settings.max_steps and tracker.max_steps and tracker.max_steps > settings.max_steps and over_steps is None:
                over_steps = tracker.max_steps
                # the child stops itself at train_begin (progress plugin); this is the fallback
                await asyncio.to_thread(stop_process_group, training.pid)
            if tracker.disk_quota is not None and training.returncode is None:
                await asyncio.to_thread(stop_process_group, training.pid)  # the plugin exits by itself; the fallback
            if progress := tracker.progress_due():
                yield progress
            if slow := tracker.eta_warning():
                yield slow
            if over := pace_overrun(run, tracker):
                yield over
    except JobError as exc:
        if exc.code != errors.DEADLINE_EXCEEDED:
            raise
        where = f", at step {tracker.step} of {tracker.max_steps}" if tracker.max_steps else " before its first step"
        raise JobError(exc.code, f"{exc.message}{where}; its checkpoints are kept: resubmit the same run_id to go on, "
                                 "or train fewer steps", log_tail=exc.log_tail) from None
    if progress := tracker.progress_due(force=True):
        yield progress
    for event in await run.uploads.drain() if run.uploads is not None and training.returncode == 0 else ():
        yield event
    if over_steps is not None:
        raise JobError(
            errors.INVALID_CONFIG,
            f"this run would train {over_steps} steps, over this worker's limit of {settings.max_steps} (FINETUNE_MAX_STEPS); "
            "lower num_epochs, or set max_steps",
        )
    if tracker.disk_quota is not None:
        raise disk_quota_error(tracker.disk_quota, run.paths)
    if tracker.stopped_at is not None and run.paths.stop_file.exists():
        raise JobError(errors.BUDGET_EXCEEDED, f"{run.paths.stop_file.read_text(encoding='utf-8')}; the training stopped at the "
                       f"checkpoint of step {tracker.stopped_at}, kept in {run.paths.output_dir}: resubmit the same run_id with a "
                       "larger budget to go on from it")
    if tracker.stopped_at is not None and run.secondary:
        raise JobError(errors.BUDGET_EXCEEDED, f"node 0 found that the job would break its budget and every node stopped at the "
                       f"checkpoint of step {tracker.stopped_at} (node 0's events say why): relaunch every node with a larger "
                       "budget to go on from it")
    if status is not None:
        for event in _cluster_events(run, status.read_new()):
            yield event
        if error := cluster_node.cluster_error(training, status.records, run.cluster, run.settings.cluster_join_timeout_s,
                                               cluster_timeout(run)):
            raise error
        if not run.cluster.primary:
            raise_unless_trained_here(training)
            return
    if tracker.nan_step is not None:
        set_aside_diverged(run.paths.output_dir, tracker.nan_step)
    raise_unless_trained(training, tracker, run.plan.config.get("base_model"))


def trained_record(run: JobRun, tracker: ProgressTracker) -> dict:
    """What trained.json keeps: the training's metrics and what it measured; a GPU run's
    measurement is also kept in the endpoint's store for later estimates (sizing/measured.py)."""
    ranks = {"peak_memory_per_rank": tracker.peak_memory_per_rank} if tracker.peak_memory_per_rank else {}
    measured = training_measured({**tracker.metrics, **ranks}, tracker.phases(), run.plan.config, run.base.config if run.base else None,
                                 run.hardware, run.world_size)
    if not run.secondary:
        record_measurement(run.settings.cache_dir / STORE_NAME, measured, run.plan.config, run.base.config if run.base else None)
    return {"metrics": {**tracker.metrics, "total_steps": tracker.max_steps}, "wandb": tracker.wandb, "measured": measured}


AFTER_TRAINING = {"evaluate": "evaluate", "export": "export", "merge_and_push": "publish", "upload": "store"}  # phase -> stage


def job_measured(run: JobRun, duration: float) -> dict:
    """The training's measurements, the phases after it so far, and what the job has cost at this worker's price."""
    measured = dict(run.trained.get("measured") or {})
    after = {name: run.stage_seconds[stage] for name, stage in AFTER_TRAINING.items() if run.stage_seconds.get(stage)}
    measured["phases_seconds"] = {**measured.get("phases_seconds", {}), **after}
    measured["duration_seconds"] = round(duration, 2)
    price = worker_price(run.settings, run.hardware, run.cluster.nodes if run.cluster is not None else 1)
    if price is not None:
        measured["cost_usd"] = round(duration * price / 3600, 4)
    return measured


def raise_unless_trained_here(training: ChildProcess) -> None:
    """A node other than node 0 reports no progress; its part went well when its torchrun did."""
    if training.returncode == 0:
        return
    if shutdown_requested():
        raise JobError(errors.CANCELLED, "the worker is shutting down and stopped the training; relaunch every node to resume")
    diagnosis = diagnose(training.returncode, training.log_tail(), "training", None, None)
    raise JobError(diagnosis.code, diagnosis.message, log_tail=training.log_tail())


def disk_quota_error(record: dict, paths: RunPaths) -> JobError:
    """The progress plugin stopped the training at a checkpoint: the run directory passed FINETUNE_MAX_RUN_BYTES."""
    step = record.get("step")
    return JobError(
        errors.DISK_QUOTA,
        f"the run directory holds {gib(int(record.get('bytes') or 0))} after the checkpoint of step {step}, over this worker's limit "
        f"of {gib(int(record.get('limit') or 0))} per run (FINETUNE_MAX_RUN_BYTES), so the training stopped there; "
        f"checkpoint-{step} is kept in {paths.output_dir} (resubmit the same run_id to go on from it once there is room), "
        "or train a new run_id that keeps fewer checkpoints (save_total_limit) or saves less often",
    )


def raise_unless_trained(training: ChildProcess, tracker: ProgressTracker, model: str | None = None) -> None:
    """Only a training that ran to its end, saved its model and kept a finite loss counts."""
    finished = training.returncode == 0 and tracker.saw_train_end and tracker.saw_saved
    if finished and tracker.nan_step is None:
        return
    if shutdown_requested():
        raise JobError(errors.CANCELLED, "the worker is shutting down and stopped the training; resubmit the same run_id to resume")
    diagnosis = diagnose(training.returncode, training.log_tail(), tracker.stage, tracker.nan_step, model)
    if training.returncode == 0 and diagnosis.code == errors.TRAINING_FAILED:
        diagnosis = diagnosis.__class__(errors.TRAINING_FAILED, "the training process exited before training finished; see log_tail")
    raise JobError(diagnosis.code, diagnosis.message, log_tail=training.log_tail())
