"""One job, top to bottom, as a spine of named stages (see STAGES):

    fail fast -> validate -> [runs / events: read the volume, answer] -> [generate: a finished run answers] -> plan -> take the run
    -> check the storage (or restore from it) -> check capacity -> prepare data -> [preflight / estimate: stop]
    -> check the budget -> check the Hub token -> train (or reuse) -> evaluate -> export (GGUF) -> publish (merge, push) -> store -> result

`run_job` is the async generator every entry point drives (RunPod's handler, the
local CLI, the tests). Every event it yields has passed the job's one redactor and
has been appended to the run's events.jsonl. Each stage reads what the stages before
it set on the `JobRun`, and may end the job early (`run.done`).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import time
import traceback
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from finetune_worker.checks import tenancy
from finetune_worker.checks.axolotl_schema import planned_config_problems
from finetune_worker.checks.distributed import cluster_storage_problems, process_count
from finetune_worker.checks.export import wants_export
from finetune_worker.checks.native import remote_code_decision
from finetune_worker.checks.storage import storage_target
from finetune_worker.checks.usertoken import check_user_token
from finetune_worker.checks.validation import (
    ValidJob,
    config_problems_error,
    early_problems,
    early_problems_error,
    validate_job,
)
from finetune_worker.contract import errors, events
from finetune_worker.contract.errors import JobError, Problem
from finetune_worker.contract.job import (
    ESTIMATE_MODE,
    ESTIMATING_MODES,
    GENERATE_MODE,
    HISTORY_MODES,
    LORA_ADAPTERS,
    READING_MODES,
    parse_job_input,
)
from finetune_worker.contract.settings import SettingsInvalid, WorkerSettings
from finetune_worker.data.estimate import job_estimate
from finetune_worker.data.stage import (
    check_data,
    data_checked,
    off_loop,
    preflight_events,
    start_preflight_standby,
    tokenize_as_training_would,
)
from finetune_worker.host import history
from finetune_worker.host.hardware import Hardware, detect_hardware
from finetune_worker.host.lock import take_run
from finetune_worker.host.redact import Redactor, redact_file, secrets_in_env, secrets_in_raw_input
from finetune_worker.host.resources import JobResources
from finetune_worker.host.rundir import (
    PreviousRun,
    append_event,
    args_digest,
    inspect_previous,
    prepare_run_dir,
    read_json,
    run_paths,
    write_config,
    write_json,
)
from finetune_worker.plan.children import build_child_env, hub_cache_dir
from finetune_worker.plan.cluster import cluster_from_env, cluster_platform
from finetune_worker.plan.config import (
    Tracking,
    build_axolotl_config,
    with_checkpoint_cap,
    with_config,
    with_continue_from,
    with_prepared_data,
    with_repo_id,
    with_resume_point,
    with_tokenizing_copy,
)
from finetune_worker.plan.credentials import hub_and_wandb_secrets, storage_secrets, tracker_secrets
from finetune_worker.plan.fast_defaults import with_fast_defaults
from finetune_worker.publish import stage as publishing
from finetune_worker.publish.card import write_loss_curve
from finetune_worker.publish.evaluation import gate
from finetune_worker.publish.export import export_types
from finetune_worker.run import budget, storage
from finetune_worker.run.job import JobRun
from finetune_worker.run.training import job_measured, progress_tracker, release_cluster, start_standby, train, trained_record
from finetune_worker.serve import stage as answering
from finetune_worker.sizing import capacity
from finetune_worker.sizing.budget import job_budget
from finetune_worker.sizing.estimate import ESTIMATE_HARDWARE
from finetune_worker.sizing.model_config import base_model_facts
from finetune_worker.sizing.resources import link_prebaked_model

LOG = logging.getLogger("finetune_worker")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
AXOLOTL_DEBUG_LOG = "debug.log"  # Axolotl tees its own log into output_dir/debug.log


async def run_job(
    raw_input: Any,
    env: Mapping[str, str] | None = None,
    hardware: Hardware | None = None,
    launch: str = "machine",
) -> AsyncIterator[dict]:
    """`launch="cluster"`: this machine is one node of a cluster (`finetune-worker cluster`)."""
    env = dict(os.environ if env is None else env)
    resources = JobResources(redactor=Redactor(secrets_in_raw_input(raw_input) + secrets_in_env(env)))
    task = asyncio.current_task()
    if task is not None:
        task.add_done_callback(resources.on_task_done)
    early: list[dict] = []  # events from before the run is taken (locked)
    async for event in _pipeline(JobRun(raw_input, env, hardware, time.monotonic(), launch=launch), resources):
        event = resources.redactor.value(event)
        if resources.events_file and resources.events_file.parent.is_dir():
            for pending in [*early, event]:
                append_event(resources.events_file, pending)
            early.clear()
        else:
            early.append(event)
        resources.ended = event["type"] in ("result", "error")
        if resources.ended:
            resources.release()
        yield event


async def _pipeline(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    yield events.status("validating", "checking the job input and the Axolotl config")
    try:
        for stage in STAGES:
            resources.check_deadline()  # FINETUNE_MAX_HOURS bounds the whole job, not only its children
            began = time.monotonic()
            async for event in stage(run, resources):
                yield event
            run.stage_seconds[stage.__name__.lstrip("_")] = round(time.monotonic() - began, 2)
            if run.done:
                return
    except JobError as exc:
        if resources.child is not None and not exc.log_tail:
            exc.log_tail = resources.child.log_tail()
        yield events.error(exc)
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            yield events.error(JobError(errors.DISK_FULL, "the volume is full (No space left on device); free space or use a larger volume"))
        else:  # a worker bug: say so without leaking internals to the client
            LOG.error("unexpected error: %s", resources.redactor.text(traceback.format_exc()))
            yield events.error(JobError(errors.INTERNAL_ERROR, f"the worker hit an unexpected {type(exc).__name__}; see the worker log"))
    finally:
        resources.stop_children()
        await resources.reap_children()
        if resources.events_file is not None:
            redact_file(run.paths.output_dir / AXOLOTL_DEBUG_LOG, resources.redactor)


async def _read_settings(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """The worker's settings (a misconfigured worker says so), its clock, its hardware."""
    try:
        run.settings = WorkerSettings.from_env(run.env)
    except SettingsInvalid as exc:
        raise JobError(errors.INVALID_CONFIG, f"this worker is misconfigured (the operator must fix its environment): {exc}") from None
    resources.start_clock(run.settings, run.started)
    run.hardware = run.hardware or detect_hardware()
    return
    yield


async def _check_user(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """Who the user is comes first: nothing is parsed, locked or started for a job whose
    user_id the operator's service has not signed (when it signs them)."""
    ignored_token = check_user_token(run.raw_input, run.settings)
    if ignored_token:
        yield events.warning(ignored_token)


async def _parse(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """The request parsed; for a job that trains or reads a run: its paths, its secrets (held
    by the redactor from now on) and the environment its children get."""
    settings = run.settings
    run.parsed, run.parse_problems = parse_job_input(run.raw_input, settings.max_request_bytes)
    job = run.parsed
    if job is None or job.mode in HISTORY_MODES:  # validation raises below, with every problem at once
        return
    run.cluster, cluster_problems = _cluster(run, job)
    run.parse_problems = [*run.parse_problems, *cluster_problems]
    run.paths = run_paths(settings.runs_dir, job.user_id, job.run_id, run.cluster.node_rank if run.cluster else 0)
    hf_token, run.wandb_key = hub_and_wandb_secrets(job, settings)
    resources.redactor.add(hf_token, run.wandb_key)
    run.child_env = build_child_env(
        run.env, paths=run.paths, cache_dir=settings.cache_dir, package_root=PACKAGE_ROOT, hf_token=hf_token,
        wandb_api_key=run.wandb_key, other_secrets=tracker_secrets(job), step_limit=settings.max_steps,
        run_bytes_limit=settings.max_run_bytes,
    )
    return
    yield


async def _fail_fast(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """What is wrong with the request itself ends the job now: before Axolotl's schema is
    imported (seconds) and before any child starts. Axolotl's own check follows otherwise."""
    if problems := early_problems(run.raw_input, (run.parsed, run.parse_problems), run.settings):
        raise early_problems_error(problems, run.parse_problems)
    return
    yield


async def _start_standby(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """A training's child (or a preflight's) starts now, so Axolotl's imports overlap the checks."""
    if run.parsed is not None and run.parsed.mode not in HISTORY_MODES and not run.parse_problems:
        await start_standby(run.parsed, run.paths, run.child_env, run.hardware, resources, cluster=run.launch == "cluster")
    if run.parsed is not None and run.parsed.mode in ESTIMATING_MODES and not run.parse_problems:
        await start_preflight_standby(run.paths, run.child_env, resources)
    return
    yield


async def _validate(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """The job and its Axolotl config, every problem at once; then where it may write
    (on a shared endpoint: checks/tenancy.py)."""
    judged_for = ESTIMATE_HARDWARE if run.parsed is not None and run.parsed.mode == ESTIMATE_MODE else run.hardware
    run.valid = validate_job(run.raw_input, run.settings, judged_for, parsed=(run.parsed, run.parse_problems))
    if run.cluster is not None and (problems := cluster_storage_problems(run.valid.args, run.settings.shared_volume)):
        raise config_problems_error(problems)
    if run.job.mode not in READING_MODES:
        run.hub_writes = tenancy.hub_writes(run.job, run.valid.args, run.settings)
        run.wandb = tenancy.wandb_target(run.job, run.valid.args, run.settings)
        for note in (*run.hub_writes.notes, *run.wandb.notes):
            yield events.status("validating", note)


async def _history(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """`mode: runs` / `mode: events`: this user's runs read back from the volume
    (no lock, no child, nothing written); the answer is the `result` event."""
    job = run.job
    if job.mode == "runs":
        yield await asyncio.to_thread(history.list_runs, run.settings.runs_dir, job.user_id, job.limit, job.offset)
        run.done = True
    elif job.mode == "events":
        yield await asyncio.to_thread(history.read_events, run.settings.runs_dir, job.user_id, job.run_id, job.limit, job.offset)
        run.done = True


async def _generate(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """`mode: generate`: a finished run of this user answers the prompts (in a child); nothing trains."""
    if run.job.mode == GENERATE_MODE:
        async for event in answering.generate(run.job, run.settings, run.child_env, resources):
            yield event
        run.done = True


async def _plan(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """The Axolotl config: the job's args, the worker's paths and plugin, CPU adaptation,
    the earlier run it continues; one process per GPU unless the job asks for fewer."""
    valid, settings, wandb = run.valid, run.settings, run.wandb
    tracking = Tracking(wandb_key=bool(run.wandb_key), model_id=valid.job.model_id, run_id=valid.job.run_id,
                        wandb_entity=wandb.entity, wandb_project=wandb.project, wandb_off_reason=wandb.off_reason)
    plan = build_axolotl_config(valid.args, run.paths, settings.cache_dir / "prepared", run.hardware, tracking)
    run.plan = with_continue_from(plan, valid.origin)
    run.processes = process_count(valid.job.num_processes, run.hardware.gpu_count)
    nodes = run.cluster.nodes if run.cluster is not None else 1
    run.budget, problems = job_budget(valid.job, settings, run.hardware, nodes) if valid.job.mode == "train" else (None, [])
    if problems:
        raise config_problems_error(problems)
    if valid.job.mode == "train" or _preflight_only(run):  # the time and cost table judges the config for GPUs, whatever this machine is
        run.estimate_config = build_axolotl_config(valid.args, run.paths, settings.cache_dir / "prepared", ESTIMATE_HARDWARE, tracking).config
        if valid.job.mode == ESTIMATE_MODE and not run.hardware.has_gpu:
            run.plan = with_tokenizing_copy(run.plan)
    return
    yield


async def _read_base_model(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """The base model's config.json and size, before any weights: for the memory and disk
    checks, and to drop trust_remote_code on a model transformers implements itself."""
    run.base, fetched = await base_model_facts(run.plan.config, run.env, run.child_env, resources)
    for event in fetched:
        yield event
    drop, note, refused = remote_code_decision(run.plan.config, run.base.config, run.settings.allow_trust_remote_code)
    if refused:
        raise config_problems_error([refused])
    if drop:
        run.plan = with_config(run.plan, trust_remote_code=None)
        yield events.warning(note)


async def _fast_defaults(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """The fast defaults this GPU can use, the operator's checkpoint cap, and Axolotl's own
    check of the final config (as `axolotl train` runs it on this hardware)."""
    hardware, processes = run.hardware, run.world_size
    speedups = capacity.speedups(run.plan.config, run.base.config, hardware, processes)
    validate = functools.partial(planned_config_problems, hardware=hardware, processes=processes)
    plan, fast = with_fast_defaults(run.plan, hardware, speedups, validate=validate)
    run.plan = with_checkpoint_cap(plan, run.settings.max_checkpoints)
    final_problems = validate(run.plan.config)
    if final_problems:
        raise config_problems_error(final_problems)
    for message in (*run.valid.notes, *run.plan.warnings, *fast.dropped):
        yield events.warning(message)
    if fast.chosen:
        yield events.status("validating", f"fast defaults for this GPU (set them in args to override): {'; '.join(fast.chosen)}", defaults=fast.chosen)
    for event in _plan_notes(run):
        yield event


async def _take_the_run(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """Lock the run, look at earlier attempts; a completed run answers with its stored result."""
    restart = run.job.restart and not (run.secondary and run.settings.shared_volume)  # node 0 moves the shared run aside
    resources.lock, taken = take_run(run.paths, run.job.user_id, run.job.run_id, restart)
    for event in taken:
        yield event
    resources.events_file = run.paths.events_file
    previous = run.previous = inspect_previous(run.paths)
    if not (run.secondary and run.job.restart):  # node 0 sets the earlier attempt aside for every node
        _check_same_config(previous, run.valid)
    if previous.result is not None and not _preflight_only(run):
        yield events.status("preparing", "this run already completed; returning its stored result (send restart: true to train it again)")
        if run.cluster is not None:
            async for event in release_cluster(run, resources):
                yield event
        yield {**previous.result, "reused": True}
        run.done = True


async def _check_storage(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """The run's bucket (the job's `storage` or the operator's): a test object written, read back
    and deleted before anything loads; a run missing from this volume is looked for there."""
    target = storage_target(run.job, run.settings)
    if target is None:
        return
    run.bucket = storage.open_bucket(target, run.child_env, storage_secrets(run.job, target, run.settings), run.paths)
    if run.secondary:  # it reads s3:// datasets; node 0 checks the bucket and keeps the run's copy
        return
    yield events.status("preparing", f"checking the storage: {target.uri}", storage=target.uri)
    await storage.probe(run.bucket, resources)
    if not (_preflight_only(run) or run.previous.has_work or run.job.restart or run.cluster is not None):
        async for event in storage.restore(run, resources):
            yield event


async def _check_capacity(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """Where training resumes, and whether it fits in GPU memory and on the disk."""
    if run.previous.trained is not None or _preflight_only(run):
        return
    for skipped in run.previous.skipped_checkpoints:
        yield events.warning(f"{skipped.name} is incomplete (the worker stopped while writing it) and is skipped")
    if (checkpoint := run.previous.checkpoint) and run.cluster is None:  # a cluster's nodes agree on it (run/cluster_rank.py)
        run.plan = with_resume_point(run.plan, checkpoint)
        step = checkpoint.name.removeprefix("checkpoint-")
        yield events.status("preparing", f"resuming from step {step} ({checkpoint.name})", resumed_from_step=int(step))
    shape = run.cluster and run.cluster.describe()
    for event in capacity.check_memory(run.plan.config, run.base.config, run.hardware, run.world_size, shape):
        yield event
    capacity.check_disk(run.plan.config, run.base, run.settings, merge=run.job.publish.merge_lora)


async def _prepare_data(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """Every dataset checked before any model loads; then config.yaml and job.json, from the complete plan."""
    paths = run.paths
    prepare_run_dir(paths)
    if run.previous.trained is None or _preflight_only(run):
        async for event in storage.fetch_datasets(run, resources):
            yield event
        yield events.status("preparing", "checking the datasets (files, rows, fields) before loading any model")
        run.checks, fingerprint = await off_loop(resources, lambda cancel: check_data(run.plan, run.settings, run.job.evaluation, cancel))
        run.plan = with_prepared_data(run.plan, fingerprint)
        if run.checks:
            yield data_checked(run.checks)
    write_config(paths.config_file, run.plan.config)
    earlier = read_json(paths.job_file)
    created = earlier.get("created") if isinstance(earlier, dict) else None
    write_json(paths.job_file, {"created": created or time.time(), **run.valid.record()})
    yield events.status("preparing", f"run directory {paths.run_dir} on {run.hardware.describe()}", run_dir=str(paths.run_dir))


async def _preflight(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """`mode: preflight` and `mode: estimate`: tokenize as training would, report with the
    time and cost table for each GPU type, and stop."""
    if _preflight_only(run):
        yield events.status("preprocessing", "preflight: loading the tokenizer and tokenizing the datasets as training would")
        tokenizing = time.monotonic()
        report = await tokenize_as_training_would(run.plan.config, run.paths, run.child_env, resources, run.checks)
        table = job_estimate(run.estimate_config, run.job, run.base, report, run.settings, time.monotonic() - tokenizing, run.plan.publish)
        for event in preflight_events(report, run.job.run_id, run.paths.run_dir, run.started, run.job.mode, table):
            yield event
        run.done = True


async def _check_budget(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """A job with a budget (max_cost, max_hours or the operator's caps): the estimate for this
    worker's GPU type and count, from its datasets tokenized as training would, checked
    against it before the base model downloads (during training: the measured pace)."""
    if run.budget is not None and run.previous.trained is None:
        async for event in budget.check_estimate(run, resources):
            yield event


async def _check_hub_token(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """Before training: the token the job writes with may write to every Hub repo the job
    names (a hub_model_id without an owner gets the token's user, unless `_validate` placed it)."""
    writes = run.hub_writes.repos
    if not writes or run.secondary:  # node 0 publishes
        return
    yield events.status("publishing", f"checking that the Hugging Face token may write to {', '.join(writes.values())}")
    user, checked = await publishing.check_token(run, resources, list(writes.values()))
    repo_id = dict(zip(writes, checked, strict=True)).get(tenancy.HUB_MODEL_ID)
    if repo_id and repo_id != writes[tenancy.HUB_MODEL_ID]:
        yield events.status("preparing", f"hub_model_id {run.repo_id!r} has no owner, so it goes to the token's user: {repo_id}")
    if repo_id and repo_id != run.repo_id:
        run.plan = with_repo_id(run.plan, repo_id)
    yield events.status("preparing", f"the token of '{user}' may push to {', '.join(checked)}")


async def _train_or_reuse(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """Train (resuming where an attempt stopped), or reuse an earlier attempt's finished training."""
    paths, base_model = run.paths, str(run.plan.config.get("base_model", ""))
    prebaked = run.env.get("FINETUNE_PREBAKED_HF_CACHE")
    if link_prebaked_model(base_model, hub_cache_dir(run.child_env), Path(prebaked) if prebaked else None):
        yield events.status("downloading", f"{base_model} is baked into the image: nothing to download")
    run.trained = run.previous.trained
    if run.trained is not None:
        yield events.status("training", "training completed in an earlier attempt; publishing its output without training again")
        if run.cluster is not None:
            async for event in release_cluster(run, resources):
                yield event
    else:
        tracker = progress_tracker(run.settings.max_hours)
        async for event in train(run, resources, tracker):
            yield event
        run.trained = trained_record(run, tracker)
        if run.cluster is not None:
            run.trained["cluster"] = {**run.cluster.record(), "shared_volume": run.settings.shared_volume}
        if not run.secondary:  # a relaunched cluster trains on every node, or on none (node 0 decides)
            write_json(paths.trained_file, run.trained)
    run.has_curve = write_loss_curve(paths.progress_file, paths.loss_curve, f"{run.job.model_id} / {run.job.run_id}")


async def _evaluate(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """The fine-tune against its base model (when asked), and the publish gate."""
    options = run.job.evaluation
    if options is None or run.secondary:
        return
    run.evaluation = read_json(run.paths.evaluation_file)  # from an earlier attempt of this run
    if run.evaluation is None:
        yield events.status("evaluating", f"comparing the fine-tuned model with its base model on up to {options.num_examples} examples")
        run.evaluation = await publishing.evaluate(run, resources)
    yield events.evaluation(
        run.trained["metrics"].get("total_steps"),
        {key: run.evaluation[key] for key in ("examples", "base", "finetuned", "delta")} | {"stage": "final"},
    )
    if options.publish_if_better:
        passed, verdict = gate(run.evaluation, options.publish_if_better, options.min_improvement)
        if not passed:
            where = f"; nothing was pushed to {run.repo_id}" if run.repo_id else ""
            run.publish_blocked = f"not published: {verdict}{where}. The artifacts are in {run.paths.output_dir}"
            yield events.warning(run.publish_blocked)


async def _export(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """GGUF files (args.export) into output/gguf, a LoRA merged into its base model first."""
    config = run.plan.config
    if not wants_export(config) or run.secondary:
        return
    run.gguf = read_json(run.paths.export_file)  # from an earlier attempt of this run
    if run.gguf is None:
        model_dir = run.paths.output_dir
        if config.get("adapter") in LORA_ADAPTERS:
            yield events.status("exporting", "merging the LoRA into the base model for the GGUF export")
            run.merged = model_dir = await publishing.merge_for_export(run, resources)
        yield events.status("exporting", f"converting the model to GGUF with llama.cpp ({export_types(config['export'])})")
        run.gguf = await publishing.export_gguf(run, resources, model_dir)
    names = ", ".join(Path(file).name for file in run.gguf)
    yield events.status("exporting", f"GGUF files in {run.paths.gguf_dir}: {names}", gguf=run.gguf)


async def _publish(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """Merge the LoRA (when asked, unless the export did), then push to the Hub (unless the gate said no)."""
    merge_lora = run.job.publish.merge_lora
    if run.secondary:
        return
    if merge_lora and run.merged is None:
        yield events.status("publishing", "merging the LoRA into the base model")
        run.merged, problem = await publishing.merge(run, resources)
        if problem:
            yield events.warning(f"merging the LoRA failed, so only the adapter is kept{' and pushed' if run.repo_id else ''}: {problem}")
    if run.repo_id and not run.publish_blocked:
        yield events.status("publishing", f"pushing to {run.repo_id}")
        run.hub = await publishing.push(run, resources, run.merged if merge_lora else None)


async def _store(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """Everything the run made, uploaded to its bucket (its checkpoints went as they landed)."""
    if run.bucket is None or run.secondary:
        return
    yield events.status("publishing", f"uploading the outputs to {run.bucket.target.uri}")
    sent = await storage.upload_outputs(run.bucket, resources, run.paths)
    run.stored = {"uri": run.bucket.target.uri, "objects": [*sent["objects"], run.bucket.target.at("events.jsonl"),
                                                            run.bucket.target.at("result.json")]}
    yield events.storage("outputs", run.bucket.target.uri, sent["bytes"], sent["seconds"], objects=len(sent["objects"]))


async def _result(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """The job's answer, also kept in result.json (a resubmission returns it)."""
    job = run.job
    if run.secondary:
        yield _node_result(run)
        return
    extra = {} if run.evaluation is None else {"evaluation": run.evaluation, "published": run.hub is not None}
    if cluster := run.trained.get("cluster"):
        extra["cluster"] = cluster
    if run.publish_blocked:
        extra["not_published_reason"] = run.publish_blocked
    if run.stored:
        extra["storage"] = run.stored
    if run.estimate_row:
        extra["estimate"] = run.estimate_row
    result = events.result(
        job.run_id, str(run.paths.output_dir), run.trained["metrics"], time.monotonic() - run.started,
        hub=run.hub, wandb=run.trained.get("wandb"), merged_dir=str(run.merged) if run.merged else None, gguf=run.gguf,
        continue_from=job.continue_from and job.continue_from.model_dump(), lineage=run.valid.lineage,
        deploy=publishing.deploy_recipe(run, run.merged, run.hub and run.hub.get("repo_id")),
        measured=job_measured(run, time.monotonic() - run.started), **extra,
    )
    if run.bucket is not None:  # result.json is kept on the volume once it is in the bucket
        await storage.upload_result(run.bucket, resources, run.paths, result)
    else:
        write_json(run.paths.result_file, result)
    yield result


STAGES = (
    _read_settings, _check_user, _parse, _fail_fast, _start_standby, _validate, _history, _generate,
    _plan, _read_base_model, _fast_defaults, _take_the_run, _check_storage, _check_capacity, _prepare_data, _preflight,
    _check_budget, _check_hub_token, _train_or_reuse, _evaluate, _export, _publish, _store, _result,
)


def _cluster(run: JobRun, job) -> tuple:
    """`finetune-worker cluster`: this node's place in the cluster (None on one node). Elsewhere
    a job asking for several nodes is refused: a serverless worker or `run` is one machine."""
    if run.launch != "cluster":
        if job.num_nodes and job.num_nodes > 1:
            return None, [Problem("num_nodes", f"this worker trains on one machine, and the job asks for {job.num_nodes} nodes: run it with "
                                  "`finetune-worker cluster JOB.json` on every node of a RunPod Instant Cluster, dstack or SkyPilot cluster "
                                  "(docs/operating.md, Clusters), or leave num_nodes out")]
        return None, []
    if cluster_platform(run.env) is None:
        return None, [Problem("cluster", "no cluster in the environment: finetune-worker cluster reads RunPod Instant Cluster, dstack or "
                              "SkyPilot variables, or NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT; on one machine use finetune-worker run")]
    return cluster_from_env(run.env, run.hardware.gpu_count, job.num_processes, job.num_nodes)


def _node_result(run: JobRun) -> dict:
    """What a node other than node 0 answers: its part is done; node 0 holds the run's result."""
    return {"type": "result", "status": "completed", "run_id": run.job.run_id, "node_rank": run.cluster.node_rank,
            "cluster": run.trained.get("cluster"), "output_dir": str(run.paths.output_dir),
            "message": f"node {run.cluster.node_rank} trained its part; node 0 ({run.cluster.host}) holds the run's result",
            "duration_seconds": round(time.monotonic() - run.started, 2)}


def _plan_notes(run: JobRun) -> list[dict]:
    """What the job runs under: the operator's limits, the earlier run it continues, the endpoint's defaults."""
    found, valid = [], run.valid
    if limits := run.settings.limits():
        found.append(events.status("validating", "this worker's limits: " + ", ".join(f"{k}={v}" for k, v in limits.items()), limits=limits))
    if origin := valid.origin:
        what = "the starting adapter" if origin.starts_as == "adapter" else "the base model"
        found.append(events.status("validating", f"continuing from run {origin.run_id} ({origin.checkpoint}): {origin.path.name} is {what}",
                                   continue_from={"run_id": origin.run_id, "checkpoint": origin.checkpoint, "as": origin.starts_as}))
    if valid.defaults_used:
        found.append(events.status("validating", f"using the endpoint's defaults for {', '.join(valid.defaults_used)} (AXOLOTL_* variables)"))
    return found


def _preflight_only(run: JobRun) -> bool:
    return run.valid.job.mode in ESTIMATING_MODES


def _check_same_config(previous: PreviousRun, valid: ValidJob) -> None:
    cont = valid.job.continue_from and valid.job.continue_from.model_dump()
    if previous.has_work and (previous.args_digest not in (None, args_digest(valid.args)) or previous.continue_from != cont):
        raise JobError(
            errors.INVALID_INPUT,
            "this run_id already has checkpoints or a result from a different config (args or continue_from); "
            "use a new run_id, or send restart: true to train again from scratch (the earlier attempt is kept)",
        )
