"""One job, top to bottom, as a spine of named stages (see STAGES):

    validate -> [runs / events: read the volume, answer] -> [generate: a finished run answers] -> plan -> take the run
    -> check capacity -> prepare data -> [preflight: stop]
    -> check the Hub token -> train (or reuse) -> evaluate -> export (GGUF) -> publish (merge, push) -> result

`run_job` is the async generator every entry point drives (RunPod's handler, the
local CLI, the tests). Every event it yields has passed the job's one redactor and
has been appended to the run's events.jsonl. Each stage reads what the stages before
it set on the `JobRun`, and may end the job early (`run.done`).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import json
import logging
import os
import time
import traceback
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from finetune_worker.checks import axolotl_schema, capacity, tenancy
from finetune_worker.checks.continue_from import LORA_ADAPTERS
from finetune_worker.checks.export import wants_export
from finetune_worker.checks.model_config import base_model_facts
from finetune_worker.checks.native import remote_code_decision
from finetune_worker.checks.options import INLINE_DATASET_KEYS
from finetune_worker.checks.resources import ModelFacts, link_prebaked_model
from finetune_worker.checks.usertoken import check_user_token
from finetune_worker.checks.validation import ValidJob, config_problems_error, validate_job
from finetune_worker.contract import errors, events
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.job import GENERATE_MODE, HISTORY_MODES, READING_MODES, parse_job_input
from finetune_worker.contract.settings import SettingsInvalid, WorkerSettings
from finetune_worker.data.download import without_url_queries
from finetune_worker.data.files import DatasetCheck
from finetune_worker.data.stage import check_data, data_checked, off_loop, preflight
from finetune_worker.plan.children import build_child_env
from finetune_worker.plan.config import (
    Tracking,
    build_axolotl_config,
    with_checkpoint_cap,
    with_config,
    with_continue_from,
    with_prepared_data,
    with_repo_id,
    with_resume_point,
)
from finetune_worker.plan.credentials import hub_and_wandb_secrets, tracker_secrets
from finetune_worker.plan.distributed import process_count
from finetune_worker.plan.fast_defaults import with_fast_defaults
from finetune_worker.publish import stage as publishing
from finetune_worker.publish.card import write_loss_curve
from finetune_worker.publish.evaluation import gate
from finetune_worker.publish.export import export_types
from finetune_worker.run import history
from finetune_worker.run.hardware import Hardware, detect_hardware
from finetune_worker.run.lock import RunLock, RunLocked
from finetune_worker.run.redact import Redactor, redact_file, secrets_in_env, secrets_in_raw_input
from finetune_worker.run.rundir import (
    PreviousRun,
    RunPaths,
    append_event,
    args_digest,
    inspect_previous,
    move_aside,
    prepare_run_dir,
    read_json,
    run_paths,
    through_link,
    write_config,
    write_json,
)
from finetune_worker.run.state import JobContext, JobState
from finetune_worker.run.training import progress_tracker, start_standby, train
from finetune_worker.serve import stage as answering

LOG = logging.getLogger("finetune_worker")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
AXOLOTL_DEBUG_LOG = "debug.log"  # Axolotl tees its own log into output_dir/debug.log


@dataclass
class JobRun:
    """What the stages learn, in order; each stage reads what the ones before it set."""

    raw_input: Any
    env: dict[str, str]
    hardware: Hardware | None
    started: float
    done: bool = False  # a stage answered the job (a stored result, a preflight)
    settings: WorkerSettings | None = None
    valid: ValidJob | None = None
    paths: RunPaths | None = None
    child_env: dict[str, str] = field(default_factory=dict)
    wandb_key: str | None = None
    hub_writes: tenancy.HubWrites = field(default_factory=lambda: tenancy.HubWrites({}))
    wandb: tenancy.WandbTarget = field(default_factory=tenancy.WandbTarget)
    ctx: JobContext | None = None
    base: ModelFacts | None = None
    previous: PreviousRun | None = None
    checks: list[DatasetCheck] = field(default_factory=list)
    trained: dict | None = None
    has_curve: bool = False
    evaluation: dict | None = None
    publish_blocked: str | None = None
    merged: Path | None = None
    gguf: list[str] | None = None
    hub: dict | None = None


async def run_job(
    raw_input: Any,
    env: Mapping[str, str] | None = None,
    hardware: Hardware | None = None,
) -> AsyncIterator[dict]:
    env = dict(os.environ if env is None else env)
    state = JobState(redactor=Redactor(secrets_in_raw_input(raw_input) + secrets_in_env(env)))
    task = asyncio.current_task()
    if task is not None:
        task.add_done_callback(state.on_task_done)
    early: list[dict] = []  # events from before the run directory exists
    async for event in _pipeline(JobRun(raw_input, env, hardware, time.monotonic()), state):
        event = state.redactor.value(event)
        if state.paths and state.paths.run_dir.is_dir():
            for pending in [*early, event]:
                append_event(state.paths, pending)
            early.clear()
        else:
            early.append(event)
        state.ended = event["type"] in ("result", "error")
        if state.ended:
            state.release()
        yield event


async def _pipeline(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    yield events.status("validating", "checking the job input and the Axolotl config")
    try:
        for stage in STAGES:
            state.check_deadline()  # FINETUNE_MAX_HOURS bounds the whole job, not only its children
            async for event in stage(run, state):
                yield event
            if run.done:
                return
    except JobError as exc:
        if state.training is not None and not exc.log_tail:
            exc.log_tail = state.training.log_tail()
        yield events.error(exc)
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            yield events.error(JobError(errors.DISK_FULL, "the volume is full (No space left on device); free space or use a larger volume"))
        else:  # a worker bug: say so without leaking internals to the client
            LOG.error("unexpected error: %s", state.redactor.text(traceback.format_exc()))
            yield events.error(JobError(errors.INTERNAL_ERROR, f"the worker hit an unexpected {type(exc).__name__}; see the worker log"))
    finally:
        state.stop_children()
        await state.reap_children()
        if state.paths is not None:
            redact_file(state.paths.output_dir / AXOLOTL_DEBUG_LOG, state.redactor)


async def _validate(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """The worker's settings, the user's identity, then the job and its Axolotl config, and
    where it may write (on a shared endpoint: checks/tenancy.py); the standby training child
    starts as soon as a training job parses."""
    try:
        settings = run.settings = WorkerSettings.from_env(run.env)
    except SettingsInvalid as exc:
        raise JobError(errors.INVALID_CONFIG, f"this worker is misconfigured (the operator must fix its environment): {exc}") from None
    state.start_clock(settings, run.started)
    # Who the user is comes first: nothing is parsed, locked or started for a job
    # whose user_id the operator's service has not signed (when it signs them).
    ignored_token = check_user_token(run.raw_input, settings)
    if ignored_token:
        yield events.warning(ignored_token)
    hardware = run.hardware = run.hardware or detect_hardware()
    job, problems = parse_job_input(run.raw_input, settings.max_request_bytes)
    if job is not None and job.mode not in HISTORY_MODES:  # else validate_job raises below, with every problem at once
        run.paths = run_paths(settings.runs_dir, job.user_id, job.run_id)
        hf_token, run.wandb_key = hub_and_wandb_secrets(job, settings)
        state.redactor.add(hf_token, run.wandb_key)
        run.child_env = build_child_env(
            run.env, paths=run.paths, cache_dir=settings.cache_dir, package_root=PACKAGE_ROOT, hf_token=hf_token,
            wandb_api_key=run.wandb_key, other_secrets=tracker_secrets(job), step_limit=settings.max_steps,
            run_bytes_limit=settings.max_run_bytes,
        )
        await start_standby(job, run.paths, run.child_env, hardware, state)
    run.valid = validate_job(run.raw_input, settings, hardware, parsed=(job, problems))
    if run.valid.job.mode not in READING_MODES:
        run.hub_writes = tenancy.hub_writes(run.valid.job, run.valid.args, settings)
        run.wandb = tenancy.wandb_target(run.valid.job, run.valid.args, settings)
        for note in (*run.hub_writes.notes, *run.wandb.notes):
            yield events.status("validating", note)


async def _history(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """`mode: runs` / `mode: events`: this user's runs read back from the volume
    (no lock, no child, nothing written); the answer is the `result` event."""
    job = run.valid.job
    if job.mode == "runs":
        yield await asyncio.to_thread(history.list_runs, run.settings.runs_dir, job.user_id, job.limit, job.offset)
        run.done = True
    elif job.mode == "events":
        yield await asyncio.to_thread(history.read_events, run.settings.runs_dir, job.user_id, job.run_id, job.limit, job.offset)
        run.done = True


async def _generate(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """`mode: generate`: a finished run of this user answers the prompts (in a child); nothing trains."""
    job = run.valid.job
    if job.mode == GENERATE_MODE:
        async for event in answering.generate(job, run.settings, run.child_env, state):
            yield event
        run.done = True


async def _plan(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """The Axolotl config: the job's args, the worker's paths and plugin, CPU adaptation,
    then the fast defaults this GPU can use, checked again by Axolotl's own schema."""
    valid, settings, hardware = run.valid, run.settings, run.hardware
    tracking = Tracking(wandb_key=bool(run.wandb_key), model_id=valid.job.model_id, run_id=valid.job.run_id,
                        wandb_entity=run.wandb.entity, wandb_project=run.wandb.project, wandb_off_reason=run.wandb.off_reason)
    plan = build_axolotl_config(valid.args, run.paths, settings.cache_dir / "prepared", hardware, tracking)
    plan = with_continue_from(plan, valid.origin)
    processes = process_count(valid.job.num_processes, hardware.gpu_count)
    run.base, fetched = await base_model_facts(plan.config, run.env, run.child_env, state)
    for event in fetched:
        yield event
    drop_flag, native_note, remote_code = remote_code_decision(plan.config, run.base.config, settings.allow_trust_remote_code)
    if remote_code:
        raise config_problems_error([remote_code])
    if drop_flag:
        plan = with_config(plan, trust_remote_code=None)
        yield events.warning(native_note)
    speedups = capacity.speedups(plan.config, run.base.config, hardware, processes)
    validate = functools.partial(_planned_config_problems, hardware=hardware, processes=processes)
    plan, fast = with_fast_defaults(plan, hardware, speedups, validate=validate)
    plan = with_checkpoint_cap(plan, settings.max_checkpoints)
    final_problems = validate(plan.config)
    if final_problems:
        raise config_problems_error(final_problems)
    for message in (*valid.notes, *plan.warnings, *fast.dropped):
        yield events.warning(message)
    if fast.chosen:
        yield events.status("validating", f"fast defaults for this GPU (set them in args to override): {'; '.join(fast.chosen)}", defaults=fast.chosen)
    if limits := settings.limits():
        yield events.status("validating", "this worker's limits: " + ", ".join(f"{k}={v}" for k, v in limits.items()), limits=limits)
    if origin := valid.origin:
        what = "the starting adapter" if origin.starts_as == "adapter" else "the base model"
        yield events.status("validating", f"continuing from run {origin.run_id} ({origin.checkpoint}): {origin.path.name} is {what}",
                            continue_from={"run_id": origin.run_id, "checkpoint": origin.checkpoint, "as": origin.starts_as})
    if valid.defaults_used:
        yield events.status("validating", f"using the endpoint's defaults for {', '.join(valid.defaults_used)} (AXOLOTL_* variables)")
    run.ctx = JobContext(valid=valid, plan=plan, paths=run.paths, settings=settings, child_env=run.child_env, num_processes=processes)


async def _take_the_run(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """Lock the run, look at earlier attempts; a completed run answers with its stored result."""
    if through_link(run.paths.run_dir):
        raise JobError(errors.INVALID_INPUT, f"run {run.valid.job.run_id!r}: its directory on the volume is a symbolic link, "
                                             "which the worker never follows; use another run_id (the operator can remove the link)")
    for event in _take_run(run.valid, run.paths, state):
        yield event
    state.paths = run.paths
    previous = run.previous = inspect_previous(run.paths)
    _check_same_config(previous, run.valid)
    if previous.result is not None and not _preflight_only(run):
        yield events.status("preparing", "this run already completed; returning its stored result (send restart: true to train it again)")
        yield {**previous.result, "reused": True}
        run.done = True


async def _check_capacity(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """Where training resumes, and whether it fits in GPU memory and on the disk."""
    if run.previous.trained is not None or _preflight_only(run):
        return
    ctx = run.ctx
    for skipped in run.previous.skipped_checkpoints:
        yield events.warning(f"{skipped.name} is incomplete (the worker stopped while writing it) and is skipped")
    if checkpoint := run.previous.checkpoint:
        run.ctx = replace(ctx, plan=with_resume_point(ctx.plan, checkpoint))
        step = checkpoint.name.removeprefix("checkpoint-")
        yield events.status("preparing", f"resuming from step {step} ({checkpoint.name})", resumed_from_step=int(step))
    for event in capacity.check_memory(ctx.plan.config, run.base.config, run.hardware, ctx.num_processes):
        yield event
    capacity.check_disk(ctx.plan.config, run.base, run.settings, merge=ctx.valid.job.publish.merge_lora)


async def _prepare_data(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """Every dataset checked before any model loads; then config.yaml and job.json, from the complete plan."""
    ctx, paths = run.ctx, run.paths
    prepare_run_dir(paths)
    if run.previous.trained is None or _preflight_only(run):
        yield events.status("preparing", "checking the datasets (files, rows, fields) before loading any model")
        run.checks, fingerprint = await off_loop(state, lambda cancel: check_data(ctx.plan, run.settings, ctx.valid.job.evaluation, cancel))
        run.ctx = ctx = replace(ctx, plan=with_prepared_data(ctx.plan, fingerprint))
        if run.checks:
            yield data_checked(run.checks)
    write_config(paths, ctx.plan.config)
    earlier = read_json(paths.job_file)
    created = earlier.get("created") if isinstance(earlier, dict) else None
    write_json(paths.job_file, {"created": created or time.time(), **_job_record(ctx.valid)})
    yield events.status("preparing", f"run directory {paths.run_dir} on {run.hardware.describe()}", run_dir=str(paths.run_dir))


async def _preflight(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """`mode: preflight`: tokenize as training would, report, and stop."""
    if _preflight_only(run):
        async for event in preflight(run.ctx, state, run.checks, run.started):
            yield event
        run.done = True


async def _check_hub_token(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """Before training: the token the job writes with may write to every Hub repo the job
    names (a hub_model_id without an owner gets the token's user, unless `_validate` placed it)."""
    ctx, writes = run.ctx, run.hub_writes.repos
    if not writes:
        return
    yield events.status("publishing", f"checking that the Hugging Face token may write to {', '.join(writes.values())}")
    user, checked = await publishing.check_token(ctx, state, list(writes.values()))
    repo_id = dict(zip(writes, checked, strict=True)).get(tenancy.HUB_MODEL_ID)
    if repo_id and repo_id != writes[tenancy.HUB_MODEL_ID]:
        yield events.status("preparing", f"hub_model_id {ctx.repo_id!r} has no owner, so it goes to the token's user: {repo_id}")
    if repo_id and repo_id != ctx.repo_id:
        run.ctx = ctx = replace(ctx, plan=with_repo_id(ctx.plan, repo_id))
    yield events.status("preparing", f"the token of '{user}' may push to {', '.join(checked)}")


async def _train_or_reuse(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """Train (resuming where an attempt stopped), or reuse an earlier attempt's finished training."""
    ctx, paths = run.ctx, run.paths
    prebaked = run.env.get("FINETUNE_PREBAKED_HF_CACHE")
    hub_cache = Path(ctx.child_env.get("HF_HUB_CACHE") or Path(ctx.child_env["HF_HOME"]) / "hub")
    if link_prebaked_model(str(ctx.plan.config.get("base_model", "")), hub_cache, Path(prebaked) if prebaked else None):
        yield events.status("downloading", f"{ctx.plan.config['base_model']} is baked into the image: nothing to download")
    run.trained = run.previous.trained
    if run.trained is not None:
        yield events.status("training", "training completed in an earlier attempt; publishing its output without training again")
    else:
        tracker = progress_tracker(run.settings.max_hours)
        async for event in train(ctx, state, tracker):
            yield event
        run.trained = {"metrics": {**tracker.metrics, "total_steps": tracker.max_steps}, "wandb": tracker.wandb}
        write_json(paths.trained_file, run.trained)
    run.has_curve = write_loss_curve(paths.progress_file, paths.loss_curve, f"{ctx.valid.job.model_id} / {ctx.valid.job.run_id}")


async def _evaluate(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """The fine-tune against its base model (when asked), and the publish gate."""
    options, ctx = run.ctx.valid.job.evaluation, run.ctx
    if options is None:
        return
    run.evaluation = read_json(ctx.paths.evaluation_file)  # from an earlier attempt of this run
    if run.evaluation is None:
        yield events.status("evaluating", f"comparing the fine-tuned model with its base model on up to {options.num_examples} examples")
        run.evaluation = await publishing.evaluate(ctx, state)
    yield events.evaluation(
        run.trained["metrics"].get("total_steps"),
        {key: run.evaluation[key] for key in ("examples", "base", "finetuned", "delta")} | {"stage": "final"},
    )
    if options.publish_if_better:
        passed, verdict = gate(run.evaluation, options.publish_if_better, options.min_improvement)
        if not passed:
            where = f"; nothing was pushed to {ctx.repo_id}" if ctx.repo_id else ""
            run.publish_blocked = f"not published: {verdict}{where}. The artifacts are in {ctx.paths.output_dir}"
            yield events.warning(run.publish_blocked)


async def _export(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """GGUF files (args.export) into output/gguf, a LoRA merged into its base model first."""
    ctx = run.ctx
    if not wants_export(ctx.plan.config):
        return
    run.gguf = read_json(ctx.paths.export_file)  # from an earlier attempt of this run
    if run.gguf is None:
        model_dir = ctx.paths.output_dir
        if ctx.plan.config.get("adapter") in LORA_ADAPTERS:
            yield events.status("exporting", "merging the LoRA into the base model for the GGUF export")
            run.merged = model_dir = await publishing.merge_for_export(ctx, state)
        yield events.status("exporting", f"converting the model to GGUF with llama.cpp ({export_types(ctx.plan.config['export'])})")
        run.gguf = await publishing.export_gguf(ctx, state, model_dir)
    names = ", ".join(Path(file).name for file in run.gguf)
    yield events.status("exporting", f"GGUF files in {ctx.paths.gguf_dir}: {names}", gguf=run.gguf)


async def _publish(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """Merge the LoRA (when asked, unless the export did), then push to the Hub (unless the gate said no)."""
    ctx = run.ctx
    merge_lora = ctx.valid.job.publish.merge_lora
    if merge_lora and run.merged is None:
        yield events.status("publishing", "merging the LoRA into the base model")
        run.merged, problem = await publishing.merge(ctx, state)
        if problem:
            yield events.warning(f"merging the LoRA failed, so only the adapter is kept{' and pushed' if ctx.repo_id else ''}: {problem}")
    if ctx.repo_id and not run.publish_blocked:
        yield events.status("publishing", f"pushing to {ctx.repo_id}")
        run.hub = await publishing.push(ctx, state, run.trained, run.has_curve, run.merged if merge_lora else None, run.evaluation, run.gguf)


async def _result(run: JobRun, state: JobState) -> AsyncIterator[dict]:
    """The job's answer, also kept in result.json (a resubmission returns it)."""
    ctx = run.ctx
    extra = {} if run.evaluation is None else {"evaluation": run.evaluation, "published": run.hub is not None}
    if run.publish_blocked:
        extra["not_published_reason"] = run.publish_blocked
    result = events.result(
        ctx.valid.job.run_id, str(ctx.paths.output_dir), run.trained["metrics"], time.monotonic() - run.started,
        hub=run.hub, wandb=run.trained.get("wandb"), merged_dir=str(run.merged) if run.merged else None, gguf=run.gguf,
        continue_from=ctx.valid.job.continue_from and ctx.valid.job.continue_from.model_dump(), lineage=ctx.valid.lineage,
        deploy=publishing.deploy_recipe(ctx, run.merged, run.hub and run.hub.get("repo_id")), **extra,
    )
    write_json(ctx.paths.result_file, result)
    yield result


STAGES = (
    _validate, _history, _generate, _plan, _take_the_run, _check_capacity, _prepare_data, _preflight,
    _check_hub_token, _train_or_reuse, _evaluate, _export, _publish, _result,
)


def _preflight_only(run: JobRun) -> bool:
    return run.valid.job.mode == "preflight"


def _take_run(valid: ValidJob, paths: RunPaths, state: JobState) -> list[dict]:
    """Lock the run (one job per run on the whole volume); move an old attempt aside on restart."""
    paths.run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = RunLock(paths.lock_file, job_id=valid.job.run_id)
    try:
        lock.acquire()
    except RunLocked as exc:
        owner = exc.owner
        where = f" (worker {owner.get('host', '?')}, pid {owner.get('pid', '?')})" if owner else ""
        raise JobError(errors.RUN_IN_PROGRESS, f"run {valid.job.user_id}/{valid.job.run_id} is already running{where}; wait for it or use another run_id") from None
    state.lock = lock
    out = []
    if lock.took_over:
        out.append(events.warning(f"took over the lock of a worker that stopped ({lock.took_over.get('host', '?')}, pid {lock.took_over.get('pid', '?')})"))
    if valid.job.restart:
        moved = move_aside(paths.run_dir)
        if moved:
            out.append(events.status("preparing", f"restart: the earlier attempt was kept as {moved.name}"))
    return out


def _check_same_config(previous: PreviousRun, valid: ValidJob) -> None:
    cont = valid.job.continue_from and valid.job.continue_from.model_dump()
    if previous.has_work and (previous.args_digest not in (None, args_digest(valid.args)) or previous.continue_from != cont):
        raise JobError(
            errors.INVALID_INPUT,
            "this run_id already has checkpoints or a result from a different config (args or continue_from); "
            "use a new run_id, or send restart: true to train again from scratch (the earlier attempt is kept)",
        )


def _planned_config_problems(config: dict, hardware: Hardware | None = None, processes: int | None = None) -> list:
    """Axolotl's check of the planned config, its plugins registered as `axolotl train`
    registers them (the last one is the worker's progress plugin, not Axolotl's), with
    the capabilities of `hardware` as `axolotl train` passes them."""
    return axolotl_schema.schema_problems(config, tuple(config["plugins"][:-1]), hardware, processes)


def _job_record(valid: ValidJob) -> dict:
    """What job.json keeps: no credential, URLs without their query (a signed URL's query
    is one), and rows sent inline as their count and digest (training rows are in the run's data/)."""
    creds = valid.job.credentials
    record = without_url_queries({
        **valid.job.model_dump(exclude={"credentials", "args"}),
        "credentials_given": {name: getattr(creds, name) is not None for name in type(creds).model_fields},
        "args_sha256": args_digest(valid.args),
        "args": valid.job.args,
        "lineage": valid.lineage,
    })
    for key in INLINE_DATASET_KEYS:
        for entry in (record.get("args") or {}).get(key) or []:
            _rows_as_digest(entry)
    if isinstance(record.get("evaluation"), dict):
        _rows_as_digest(record["evaluation"].get("dataset"))
    return record


def _rows_as_digest(entry: Any) -> None:
    """`rows: [...]` -> `rows: {"count": N, "sha256": ...}`, in place."""
    if isinstance(entry, dict) and isinstance(entry.get("rows"), list):
        rows = entry["rows"]
        entry["rows"] = {"count": len(rows), "sha256": hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()}
