"""One job, top to bottom: validate -> plan -> prepare run dir -> train -> result.

`run_job` is the async generator every entry point drives (RunPod's handler, the
local CLI, the tests). Every event it yields has passed the job's one redactor and
has been appended to the run's events.jsonl.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from . import axolotl_schema, errors, events
from .data import DatasetCheck, DownloadRules, check_datasets, check_eval_file, data_fingerprint, materialise, without_url_queries
from .distributed import process_count
from .errors import JobError
from .evaluation import gate
from .events import ProgressTracker
from .failures import diagnose
from .hardware import Hardware, detect_hardware
from .job import EvaluationOptions, JobInput, parse_job_input
from .memory import CLEARLY_OVER, estimate_gpu_memory, suggestions
from .options import CREDENTIAL_ENV
from .plan import (
    AxolotlPlan,
    RunPaths,
    Speedups,
    Tracking,
    apply_fast_defaults,
    build_axolotl_config,
    build_child_env,
    build_train_argv,
    run_paths,
)
from .redact import Redactor, redact_file, secrets_in_env, secrets_in_raw_input
from .report import evaluation_sections, framework_versions, render_model_card, write_loss_curve
from .resources import ModelFacts, directory_facts, estimate_disk, gib, link_prebaked_model, model_facts
from .rundir import (
    PreviousRun,
    append_event,
    args_digest,
    inspect_previous,
    move_aside,
    prepare_run_dir,
    read_json,
    set_aside_diverged,
    write_config,
    write_json,
)
from .runlock import RunLock, RunLocked
from .settings import SettingsInvalid, WorkerSettings
from .training import TrainingProcess, shutdown_requested, stop_process_group
from .usertoken import check_user_token
from .validation import ValidJob, config_problems_error, validate_job

LOG = logging.getLogger("finetune_worker")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
AXOLOTL_DEBUG_LOG = "debug.log"  # Axolotl tees its own log into output_dir/debug.log
STEP_STOP_S = 10.0  # how long a cancelled job waits for its data step's thread to stop
T = TypeVar("T")
ETA_WARNING_SECONDS = 24 * 3600  # a training whose ETA is beyond this (or FINETUNE_MAX_HOURS) is warned about once
MODEL_CONFIG_TIMEOUT_S = 120.0  # the base model's config.json from the Hub: seconds, unless the Hub is unwell


@dataclass
class JobState:
    """What outlives the generator: the run's paths, its lock and its training."""

    redactor: Redactor = field(default_factory=Redactor)
    paths: RunPaths | None = None
    lock: RunLock | None = None
    training: TrainingProcess | None = None
    standby: TrainingProcess | None = None  # a training child importing Axolotl while the checks run
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
    async for event in _pipeline(raw_input, env, hardware, state):
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


@dataclass(frozen=True)
class JobContext:
    """Everything the steps after validation share."""

    valid: ValidJob
    plan: AxolotlPlan
    paths: RunPaths
    settings: WorkerSettings
    child_env: dict[str, str]
    num_processes: int = 1

    @property
    def repo_id(self) -> str | None:
        return self.plan.publish.get("hub_model_id")


async def _pipeline(raw_input: Any, env: dict[str, str], hardware: Hardware | None, state: JobState) -> AsyncIterator[dict]:
    started = time.monotonic()
    yield events.status("validating", "checking the job input and the Axolotl config")
    try:
        try:
            settings = WorkerSettings.from_env(env)
        except SettingsInvalid as exc:
            raise JobError(errors.INVALID_CONFIG, f"this worker is misconfigured (the operator must fix its environment): {exc}") from None
        # Who the user is comes first: nothing is parsed, locked or started for a job
        # whose user_id the operator's service has not signed (when it signs them).
        ignored_token = check_user_token(raw_input, settings)
        if ignored_token:
            yield events.warning(ignored_token)
        hardware = hardware or detect_hardware()
        job, problems = parse_job_input(raw_input, settings.max_request_bytes)
        if job is not None:  # else validate_job raises below, with every problem at once
            paths = run_paths(settings.runs_dir, job.user_id, job.run_id)
            hf_token, wandb_key = _secrets(job, settings)
            state.redactor.add(hf_token, wandb_key)
            child_env = build_child_env(
                env, paths=paths, cache_dir=settings.cache_dir, package_root=PACKAGE_ROOT, hf_token=hf_token, wandb_api_key=wandb_key,
                other_secrets=_tracker_secrets(job), step_limit=settings.max_steps,
            )
            await _start_standby(job, paths, child_env, hardware, state)
        valid = validate_job(raw_input, settings, hardware, parsed=(job, problems))
        tracking = Tracking(wandb_key=bool(wandb_key), model_id=valid.job.model_id, run_id=valid.job.run_id)
        plan = build_axolotl_config(valid.args, paths, settings.cache_dir / "prepared", hardware, tracking)
        processes = process_count(valid.job.num_processes, hardware.gpu_count)
        base, fetched = await _base_model_facts(plan.config, env, child_env, state)
        for event in fetched:
            yield event
        speedups = _speedups(plan.config, base.config, hardware, processes)
        fast = apply_fast_defaults(plan.config, hardware, speedups, validate=_planned_config_problems)
        final_problems = _planned_config_problems(plan.config)
        if final_problems:
            raise config_problems_error(final_problems)
        for message in (*valid.notes, *plan.warnings, *fast.dropped):
            yield events.warning(message)
        if fast.chosen:
            yield events.status("validating", f"fast defaults for this GPU (set them in args to override): {'; '.join(fast.chosen)}", defaults=fast.chosen)
        if settings.limits():
            limits = settings.limits()
            yield events.status("validating", "this worker's limits: " + ", ".join(f"{k}={v}" for k, v in limits.items()), limits=limits)
        if valid.defaults_used:
            yield events.status("validating", f"using the endpoint's defaults for {', '.join(valid.defaults_used)} (AXOLOTL_* variables)")

        for event in _take_run(valid, paths, state):
            yield event
        state.paths = paths
        previous = inspect_previous(paths)
        _check_same_config(previous, valid)
        preflight_only = valid.job.mode == "preflight"
        if previous.result is not None and not preflight_only:
            yield events.status("preparing", "this run already completed; returning its stored result (send restart: true to train it again)")
            yield {**previous.result, "reused": True}
            return
        if previous.trained is None and not preflight_only:
            for event in _resume_point(previous, plan):
                yield event
            for event in _check_memory(plan.config, base.config, hardware, processes):
                yield event
            _check_disk(plan.config, base, settings)

        prepare_run_dir(paths)
        checks: list[DatasetCheck] = []
        if previous.trained is None or preflight_only:
            yield events.status("preparing", "checking the datasets (files, rows, fields) before loading any model")
            checks = await _off_loop(state, lambda cancel: _prepare_data(plan, settings, valid.job.evaluation, cancel))
            if checks:
                yield _data_checked(checks)
        write_config(paths, plan.config)
        write_json(paths.job_file, _job_record(valid))
        ctx = JobContext(valid=valid, plan=plan, paths=paths, settings=settings, child_env=child_env, num_processes=processes)
        yield events.status("preparing", f"run directory {paths.run_dir} on {hardware.describe()}", run_dir=str(paths.run_dir))
        if preflight_only:
            async for event in _preflight(ctx, state, checks, started):
                yield event
            return
        if ctx.repo_id:
            yield events.status("publishing", f"checking that the Hugging Face token may write to {ctx.repo_id}")
            user, repo_id = await _check_token(ctx, state)
            if repo_id != ctx.repo_id:
                yield events.status("preparing", f"hub_model_id {ctx.repo_id!r} has no owner, so it goes to the token's user: {repo_id}")
                ctx = replace(ctx, plan=replace(ctx.plan, publish={**ctx.plan.publish, "hub_model_id": repo_id}))
            yield events.status("preparing", f"the token of '{user}' may push to {ctx.repo_id}")

        prebaked = env.get("FINETUNE_PREBAKED_HF_CACHE")
        hub_cache = Path(child_env.get("HF_HUB_CACHE") or Path(child_env["HF_HOME"]) / "hub")
        if link_prebaked_model(str(plan.config.get("base_model", "")), hub_cache, Path(prebaked) if prebaked else None):
            yield events.status("downloading", f"{plan.config['base_model']} is baked into the image: nothing to download")

        trained = previous.trained
        if trained is not None:
            yield events.status("training", "training completed in an earlier attempt; publishing its output without training again")
        else:
            tracker = ProgressTracker(eta_warning_seconds=min(ETA_WARNING_SECONDS, 3600 * (settings.max_hours or float("inf"))))
            async for event in _train(ctx, state, tracker):
                yield event
            trained = {"metrics": {**tracker.metrics, "total_steps": tracker.max_steps}, "wandb": tracker.wandb}
            write_json(paths.trained_file, trained)
        has_curve = write_loss_curve(paths.progress_file, paths.loss_curve, f"{valid.job.model_id} / {valid.job.run_id}")

        evaluation, publish_blocked = None, None
        if valid.job.evaluation is not None:
            options = valid.job.evaluation
            evaluation = read_json(paths.evaluation_file)  # from an earlier attempt of this run
            if evaluation is None:
                yield events.status("evaluating", f"comparing the fine-tuned model with its base model on up to {options.num_examples} examples")
                evaluation = await _evaluate(ctx, state)
            yield events.evaluation(
                trained["metrics"].get("total_steps"),
                {key: evaluation[key] for key in ("examples", "base", "finetuned", "delta")} | {"stage": "final"},
            )
            if options.publish_if_better:
                passed, verdict = gate(evaluation, options.publish_if_better, options.min_improvement)
                if not passed:
                    where = f"; nothing was pushed to {ctx.repo_id}" if ctx.repo_id else ""
                    publish_blocked = f"not published: {verdict}{where}. The artifacts are in {paths.output_dir}"
                    yield events.warning(publish_blocked)

        merged = None
        if valid.job.publish.merge_lora:
            yield events.status("publishing", "merging the LoRA into the base model")
            merged, problem = await _merge(ctx, state)
            if problem:
                yield events.warning(f"merging the LoRA failed, so only the adapter is kept{' and pushed' if ctx.repo_id else ''}: {problem}")
        hub = None
        if ctx.repo_id and not publish_blocked:
            yield events.status("publishing", f"pushing to {ctx.repo_id}")
            hub = await _push(ctx, state, trained, has_curve, merged, evaluation)
        extra = {} if evaluation is None else {"evaluation": evaluation, "published": hub is not None}
        if publish_blocked:
            extra["not_published_reason"] = publish_blocked
        result = events.result(
            valid.job.run_id, str(paths.output_dir), trained["metrics"], time.monotonic() - started,
            hub=hub, wandb=trained.get("wandb"), merged_dir=str(merged) if merged else None, **extra,
        )
        write_json(paths.result_file, result)
        yield result
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


async def _base_model_facts(config: dict, env: dict[str, str], child_env: dict[str, str], state: JobState) -> tuple[ModelFacts, list[dict]]:
    """The base model's config and size, for the memory and disk checks: (facts, events).

    From disk when the model is local, cached or baked into the image, or the Hub is off
    (HF_HUB_OFFLINE). Otherwise, on the first job for a Hub model, a child
    (`python -m finetune_worker.hub model-config`, the token in its environment only)
    downloads config.json and the weights' index into the Hub cache, before any weights:
    a gated model or a bad token fails here (auth_error), a missing repo or config.json too
    (model_load_error). A Hub that cannot be reached is not the user's fault: a warning,
    and the job goes on without the estimate (the download comes later anyway)."""
    base_model = str(config.get("base_model", ""))
    hub_cache = Path(child_env.get("HF_HUB_CACHE") or Path(child_env["HF_HOME"]) / "hub")
    facts = model_facts(base_model, Path(child_env["HF_HOME"]), hub_cache)
    prebaked = env.get("FINETUNE_PREBAKED_HF_CACHE")
    if facts.config is None and prebaked:
        baked = model_facts(base_model, Path(prebaked), Path(prebaked))
        if baked.config is not None:
            return baked, []
    offline = child_env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    local = base_model.startswith(("/", ".", "~")) or Path(base_model).exists()
    if facts.config is not None or offline or local or not base_model:
        return facts, []
    revision = config.get("revision_of_model")
    argv = [sys.executable, "-m", "finetune_worker.hub", "model-config", "--model", base_model, *(["--revision", str(revision)] if revision else [])]
    with tempfile.TemporaryDirectory(prefix="model-config-") as scratch:  # the run directory is not ours yet
        out = Path(scratch) / "result.json"
        tool = state.training = TrainingProcess([*argv, "--out", str(out)], child_env, Path(scratch) / "hub-model-config.log", Path(scratch) / ".records", state.redactor)
        try:
            await tool.start()
            async for _ in tool.records(deadline=time.monotonic() + MODEL_CONFIG_TIMEOUT_S):
                pass
            outcome = read_json(out) or {"ok": False, "code": "network", "message": f"the Hub step exited with code {tool.returncode}"}
        finally:
            state.training = None
        if tool.timed_out:
            outcome = {"ok": False, "code": "network", "message": f"the Hub did not answer in {MODEL_CONFIG_TIMEOUT_S:.0f} s"}
    if outcome.get("ok"):
        snapshot = outcome.get("snapshot")
        facts = directory_facts(Path(snapshot)) if snapshot and Path(snapshot).is_dir() else model_facts(base_model, Path(child_env["HF_HOME"]), hub_cache)
        size = f"{gib(facts.weight_bytes)} of weights to download" if facts.weight_bytes else "weights of unknown size to download"
        return facts, [events.status("validating", f"read {base_model}'s config.json from the Hugging Face Hub ({size})")]
    if outcome.get("code") in (errors.AUTH_ERROR, errors.MODEL_LOAD_ERROR):
        raise JobError(outcome["code"], outcome["message"], log_tail=tool.log_tail())
    return facts, [events.warning(f"no memory estimate: could not read {base_model}'s config.json from the Hub ({outcome.get('message')}); going on")]


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


async def _off_loop(state: JobState, step: Callable[[threading.Event], T]) -> T:
    """Run a blocking step in a thread, so that the event loop (and a cancel) keeps running.

    A cancel sets the step's flag, which the step checks between chunks of what it reads
    or writes; the job waits for the thread to stop before it ends and frees the run.
    """
    cancel = state.step_cancel = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, step, cancel)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        await asyncio.wait([future], timeout=STEP_STOP_S)
        future.add_done_callback(lambda done: done.cancelled() or done.exception())  # its Cancelled is expected
        raise
    finally:
        state.step_cancel = None


def _prepare_data(
    plan: AxolotlPlan, settings: WorkerSettings, evaluation: EvaluationOptions | None, cancel: threading.Event | None = None,
) -> list[DatasetCheck]:
    """Inline and URL datasets into the run dir, every local row checked, the cache keyed by content.

    Runs in a thread (`_off_loop`); every file is streamed, in constant memory."""
    materialise(plan.data_sources, DownloadRules.from_settings(settings), cancel)
    if evaluation is not None and evaluation.dataset.path:
        check_eval_file(evaluation.dataset.path, evaluation.dataset.format, cancel)
    inline = {source.where: source for source in plan.data_sources if source.rows is not None}
    checks = check_datasets(plan.config, inline, cancel)
    prepared_root = Path(plan.config["dataset_prepared_path"])
    plan.config["dataset_prepared_path"] = str(prepared_root / data_fingerprint(plan.config, checks, cancel))
    return checks


def _data_checked(checks: list[DatasetCheck]) -> dict:
    rows = sum(check.rows for check in checks)
    empty = sum(check.empty_rows for check in checks)
    note = f"; {empty} with an empty response (nothing to train on)" if empty else ""
    return events.status(
        "preparing",
        f"{rows} rows in {len(checks)} local dataset(s) parse and have the fields their type needs{note}",
        datasets={check.where: check.summary() for check in checks},
    )


async def _preflight(ctx: JobContext, state: JobState, checks: list[DatasetCheck], started: float) -> AsyncIterator[dict]:
    """Tokenize as training would, report, and stop: no model weights, no training."""
    paths = ctx.paths
    yield events.status("preprocessing", "preflight: loading the tokenizer and tokenizing the datasets as training would")
    tool, report = await _json_tool(ctx, state, "preflight", "finetune_worker.preflight", str(paths.config_file), out=paths.preflight_file)
    if tool.returncode != 0 or report is None:
        diagnosis = diagnose(tool.returncode, tool.log_tail(), "preprocessing", None, ctx.plan.config.get("base_model"))
        raise JobError(diagnosis.code, f"preflight failed: {diagnosis.message}", log_tail=tool.log_tail())
    empty = {check.where: check.empty_rows for check in checks}
    for dataset in report["datasets"]:
        dataset["empty_rows"] = empty.get(dataset["where"], 0)
    report["total"]["empty_rows"] = sum(dataset["empty_rows"] for dataset in report["datasets"])
    for dataset in report["datasets"]:
        yield events.status("preprocessing", _describe_dataset(dataset, report), dataset=dataset)
    for example in report["examples"]:
        yield events.status("preprocessing", f"example {example['dataset']} row {example['row']} ([[...]] is trained on)", example=example)
    yield events.result(
        ctx.valid.job.run_id, str(paths.run_dir), report["total"], time.monotonic() - started, mode="preflight", preflight=report,
    )


def _describe_dataset(dataset: dict, report: dict) -> str:
    tokens = dataset["tokens"]
    fates = []
    if dataset["too_long"]:
        fate = "truncated" if dataset["truncated"] else "dropped"
        fates.append(f"{dataset['too_long']} longer than sequence_len {report['sequence_len']}: {fate}")
    if dataset["too_short"]:
        fates.append(f"{dataset['too_short']} too short: dropped")
    if dataset["no_trained_tokens"]:
        fates.append(f"{dataset['no_trained_tokens']} with nothing to train on")
    return (
        f"{dataset['where']}: {dataset['rows_read']} rows, {dataset['rows_kept']} kept"
        + (f" ({'; '.join(fates)})" if fates else "")
        + f"; {tokens['total']} tokens, {tokens['trained']} trained on; "
        f"{tokens['min']}-{tokens['max']} per example (median {tokens['median']})"
    )


def _check_same_config(previous: PreviousRun, valid: ValidJob) -> None:
    if previous.has_work and previous.args_digest not in (None, args_digest(valid.args)):
        raise JobError(
            errors.INVALID_INPUT,
            "this run_id already has checkpoints or a result from a different config; "
            "use a new run_id, or send restart: true to train again from scratch (the earlier attempt is kept)",
        )


def _resume_point(previous: PreviousRun, plan: AxolotlPlan) -> list[dict]:
    out = []
    for skipped in previous.skipped_checkpoints:
        out.append(events.warning(f"{skipped.name} is incomplete (the worker stopped while writing it) and is skipped"))
    if previous.checkpoint is not None:
        plan.config["resume_from_checkpoint"] = str(previous.checkpoint)
        step = previous.checkpoint.name.removeprefix("checkpoint-")
        out.append(events.status("preparing", f"resuming from step {step} ({previous.checkpoint.name})", resumed_from_step=int(step)))
    return out


def _planned_config_problems(config: dict) -> list:
    """Axolotl's check of the planned config, its plugins registered as `axolotl train`
    registers them (the last one is the worker's progress plugin, not Axolotl's)."""
    return axolotl_schema.schema_problems(config, tuple(config["plugins"][:-1]))


def _speedups(config: dict, model_config: dict | None, hardware: Hardware, processes: int) -> Speedups:
    """What this GPU worker can use for speed: installed kernels, the model type, memory headroom."""
    if not hardware.has_gpu:
        return Speedups()
    import importlib.util

    model_config = model_config or {}
    fits = True
    if "hidden_size" in model_config and hardware.gpu_memory_bytes:
        plain = estimate_gpu_memory({**config, "gradient_checkpointing": False}, model_config, processes)
        fits = plain.total <= 0.9 * min(hardware.gpu_memory_bytes)
    return Speedups(
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
        liger=importlib.util.find_spec("liger_kernel") is not None,
        model_type=model_config.get("model_type"),
        fits_without_checkpointing=fits,
    )


def _check_memory(config: dict, model_config: dict | None, hardware: Hardware, processes: int) -> list[dict]:
    """Peak GPU memory per GPU against the smallest GPU present; fail when it clearly cannot fit."""
    if not hardware.has_gpu:
        return []
    if not model_config or "hidden_size" not in model_config:
        return [events.status("preparing", "no memory estimate: the base model's config is not on the volume yet")]
    estimate = estimate_gpu_memory(config, model_config, processes)
    capacity = min(hardware.gpu_memory_bytes)
    if estimate.total > capacity * CLEARLY_OVER:
        raise JobError(
            errors.OUT_OF_MEMORY,
            f"this config needs about {estimate.describe()}, but each GPU has {gib(capacity)}; "
            f"it will not fit. Try {suggestions(config, processes)}",
        )
    return [events.status(
        "preparing", f"estimated peak GPU memory: {estimate.describe()} of {gib(capacity)} per GPU",
        memory_estimate_bytes=estimate.total, memory_parts_bytes=estimate.parts, gpu_memory_bytes=capacity,
    )]


def _check_disk(config: dict, base: ModelFacts, settings: WorkerSettings) -> None:
    estimate = estimate_disk(config, base)
    if estimate is None:
        return
    free = shutil.disk_usage(settings.base_volume).free
    if estimate.total > free:
        raise JobError(
            errors.DISK_FULL,
            f"this run will write {estimate.describe()}, but the volume has {gib(free)} free; "
            "free space, lower save_total_limit, or use a larger volume",
        )


async def _train(ctx: JobContext, state: JobState, tracker: ProgressTracker) -> AsyncIterator[dict]:
    """Run `axolotl train` in a child process and turn its progress records into events."""
    paths = ctx.paths
    standby, state.standby = state.standby, None
    if standby is not None and standby.on_standby:
        training = state.training = standby
        await training.go()
    else:
        if standby is not None:
            standby.stop()
        if ctx.num_processes > 1:
            argv = build_train_argv(sys.executable, paths.config_file, ctx.num_processes, _free_port())
            yield events.status("training", f"launching {ctx.num_processes} training processes with accelerate (events come from rank 0)", num_processes=ctx.num_processes)
        else:
            argv = build_train_argv(sys.executable, paths.config_file)
        training = state.training = TrainingProcess(argv, ctx.child_env, paths.log_file, paths.progress_file, state.redactor)
        await training.start()
    settings = ctx.settings
    deadline = time.monotonic() + 3600 * settings.max_hours if settings.max_hours else None
    over_steps = None
    async for batch in training.records(deadline=deadline):
        for record in batch:
            for event in tracker.feed(record):
                yield event
        if settings.max_steps and tracker.max_steps and tracker.max_steps > settings.max_steps and over_steps is None:
            over_steps = tracker.max_steps
            # before its first step; records() goes on draining its output and ends as the process does
            await asyncio.to_thread(stop_process_group, training.pid)
        if progress := tracker.progress_due():
            yield progress
        if slow := tracker.eta_warning():
            yield slow
    if progress := tracker.progress_due(force=True):
        yield progress
    if over_steps is not None:
        raise JobError(
            errors.INVALID_CONFIG,
            f"this run would train {over_steps} steps, over this worker's limit of {settings.max_steps} (FINETUNE_MAX_STEPS); "
            "lower num_epochs, or set max_steps",
        )
    if training.timed_out:
        raise JobError(
            errors.TRAINING_FAILED,
            f"the training was stopped after {settings.max_hours} h, this worker's limit (FINETUNE_MAX_HOURS), at step {tracker.step}"
            f" of {tracker.max_steps}; its checkpoints are kept: resubmit the same run_id to go on, or train fewer steps",
            log_tail=training.log_tail(),
        )
    if tracker.nan_step is not None:
        set_aside_diverged(paths.output_dir, tracker.nan_step)
    _raise_unless_trained(training, tracker, ctx.plan.config.get("base_model"))


async def _start_standby(job: JobInput, paths: RunPaths, child_env: dict[str, str], hardware: Hardware, state: JobState) -> None:
    """Start the training child now, so Axolotl's imports overlap the checks, the data
    step and the Hub check; it trains only on `go`, and is stopped if the job ends first."""
    if job.mode != "train" or process_count(job.num_processes, hardware.gpu_count) > 1:
        return
    if not job.restart and (paths.result_file.exists() or paths.trained_file.exists()):
        return  # nothing left to train
    argv = [sys.executable, "-m", "finetune_worker.standby", str(paths.config_file)]
    standby = TrainingProcess(argv, child_env, paths.log_file, paths.progress_file, state.redactor)
    await standby.start(standby=True)
    state.standby = standby


async def _run_tool(ctx: JobContext, state: JobState, argv: list[str], name: str) -> TrainingProcess:
    """A helper child process (Hub check, push, merge) with its own log in the run dir."""
    tool = TrainingProcess(argv, ctx.child_env, ctx.paths.run_dir / f"{name}.log", ctx.paths.run_dir / f".{name}.records", state.redactor)
    state.training = tool  # a cancel stops it like a training
    await tool.start()
    async for _ in tool.records():
        pass
    return tool


async def _json_tool(ctx: JobContext, state: JobState, name: str, module: str, *args: str, out: Path | None = None) -> tuple[TrainingProcess, Any]:
    """`python -m <module> ARGS --out FILE` as a helper child; (the process, the JSON it wrote or None)."""
    out = out or ctx.paths.run_dir / f".{name}.json"
    out.unlink(missing_ok=True)
    tool = await _run_tool(ctx, state, [sys.executable, "-m", module, *args, "--out", str(out)], name)
    return tool, read_json(out)


async def _hub_tool(ctx: JobContext, state: JobState, name: str, *args: str) -> dict:
    tool, outcome = await _json_tool(ctx, state, name, "finetune_worker.hub", *args)
    outcome = outcome or {"ok": False, "code": errors.PUSH_FAILED, "message": f"the Hub step exited with code {tool.returncode}"}
    if not outcome.get("ok"):
        outcome["log_tail"] = tool.log_tail()
    return outcome


async def _check_token(ctx: JobContext, state: JobState) -> tuple[str, str]:
    """The token's user, and the repo the push goes to (with its owner)."""
    outcome = await _hub_tool(ctx, state, "hub-check", "check", "--repo-id", ctx.repo_id)
    if not outcome["ok"]:
        raise JobError(errors.AUTH_ERROR, outcome["message"], log_tail=outcome.get("log_tail", []))
    return outcome.get("user", "?"), outcome.get("repo_id", ctx.repo_id)


async def _merge(ctx: JobContext, state: JobState) -> tuple[Path | None, str | None]:
    """Axolotl's merge-lora into <output_dir>/merged; (merged dir, None) or (None, why not)."""
    argv = [sys.executable, "-m", "axolotl.cli.merge_lora", str(ctx.paths.config_file), f"--lora_model_dir={ctx.paths.output_dir}"]
    tool = await _run_tool(ctx, state, argv, "merge")
    merged = ctx.paths.output_dir / "merged"
    if tool.returncode == 0 and merged.is_dir() and any(merged.glob("*.safetensors")):
        return merged, None
    tail = [line for line in tool.log_tail() if line.strip()]
    return None, (tail[-1] if tail else f"merge-lora exited with code {tool.returncode}")


async def _evaluate(ctx: JobContext, state: JobState) -> dict:
    """Base model vs fine-tune on the eval examples, kept in evaluation.json (a resubmission reuses it)."""
    paths = ctx.paths
    spec_file = paths.run_dir / "evaluation-spec.json"
    write_json(spec_file, {"config": str(paths.config_file), "evaluation": ctx.valid.job.evaluation.model_dump()})
    tool, evaluation = await _json_tool(ctx, state, "evaluation", "finetune_worker.evaluation", str(spec_file))
    if tool.returncode != 0 or evaluation is None:
        diagnosis = diagnose(tool.returncode, tool.log_tail(), "evaluating", None, ctx.plan.config.get("base_model"))
        raise JobError(
            diagnosis.code,
            f"training succeeded, but the evaluation failed: {diagnosis.message}. The model is in {paths.output_dir}; "
            "resubmit the same run_id to evaluate again without training",
            log_tail=tool.log_tail(),
        )
    write_json(paths.evaluation_file, evaluation)
    return evaluation


async def _push(
    ctx: JobContext, state: JobState, trained: dict, has_curve: bool, merged: Path | None, evaluation: dict | None = None
) -> dict:
    paths, publish = ctx.paths, ctx.plan.publish
    merged_repo = ctx.valid.job.publish.merged_hub_model_id
    merged_where = None if merged is None else (merged_repo or f"{ctx.repo_id}:merged")
    card = render_model_card(
        repo_id=ctx.repo_id, config=ctx.plan.config, metrics=trained["metrics"], versions=framework_versions(),
        has_loss_curve=has_curve, merged=merged_where, extra_sections=evaluation_sections(evaluation) if evaluation else [],
    )
    paths.hub_dir.mkdir(exist_ok=True)
    (paths.hub_dir / "README.md").write_text(card, encoding="utf-8")
    extra = {"README.md": str(paths.hub_dir / "README.md")}
    if has_curve:
        extra["loss.png"] = str(paths.loss_curve)
    spec = {
        "repo_id": ctx.repo_id,
        "private": publish.get("hub_private_repo", True),
        "revision": publish.get("hub_revision"),
        "folder": str(paths.output_dir),
        "extra_files": extra,
        "commit_message": f"finetune-worker: {ctx.valid.job.model_id} run {ctx.valid.job.run_id}",
        "merged": None if merged is None else {
            "repo_id": merged_repo or ctx.repo_id, "folder": str(merged), "prefix": "" if merged_repo else "merged/",
        },
    }
    write_json(paths.hub_dir / "publish.json", spec)
    outcome = await _hub_tool(ctx, state, "hub-push", "push", "--spec", str(paths.hub_dir / "publish.json"))
    if not outcome["ok"]:
        code = outcome.get("code") if outcome.get("code") == errors.AUTH_ERROR else errors.PUSH_FAILED
        raise JobError(
            code,
            f"training succeeded, but publishing failed: {outcome['message']}. The artifacts are on the volume in "
            f"{paths.output_dir}; resubmit the same run_id to push them without training again",
            log_tail=outcome.get("log_tail", []),
        )
    outcome.pop("ok")
    return outcome


def _secrets(job: JobInput, settings: WorkerSettings) -> tuple[str | None, str | None]:
    """The job's credentials, each falling back to the worker's environment."""
    creds = job.credentials
    return _secret(creds.hf_token, settings.hf_token), _secret(creds.wandb_api_key, settings.wandb_api_key)


def _tracker_secrets(job: JobInput) -> dict[str, str]:
    """Other trackers' keys from the job's credentials, under the names their libraries read."""
    creds = job.credentials
    given = {env: getattr(creds, field) for field, env in CREDENTIAL_ENV.items()}
    return {env: value.get_secret_value() for env, value in given.items() if value is not None}


def _secret(job_value, worker_value) -> str | None:
    chosen = job_value or worker_value
    return chosen.get_secret_value() if chosen else None


def _job_record(valid: ValidJob) -> dict:
    """What job.json keeps: no credential, and URLs without their query (a signed URL's query is one)."""
    creds = valid.job.credentials
    return without_url_queries({
        **valid.job.model_dump(exclude={"credentials", "args"}),
        "credentials_given": {name: getattr(creds, name) is not None for name in type(creds).model_fields},
        "args_sha256": args_digest(valid.args),
        "args": valid.job.args,
    })


def _free_port() -> int:
    """A free TCP port for torch.distributed's rendezvous, so jobs never collide on 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _raise_unless_trained(training: TrainingProcess, tracker: ProgressTracker, model: str | None = None) -> None:
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
