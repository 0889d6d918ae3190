"""The data stage: every dataset checked before any model loads, and the preflight.

The row check reads files in a thread (`off_loop`), streamed in constant memory; the
preflight tokenizes as training would, in a helper child, and stops.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from finetune_worker.contract import events
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.job import EvaluationOptions
from finetune_worker.contract.settings import WorkerSettings
from finetune_worker.data.download import DownloadRules, materialise
from finetune_worker.data.files import DatasetCheck, check_datasets, check_eval_file
from finetune_worker.data.fingerprint import data_fingerprint
from finetune_worker.host.failures import diagnose
from finetune_worker.host.resources import JobResources
from finetune_worker.host.rundir import RunPaths, read_json
from finetune_worker.host.tools import finish_standby, job_child, json_tool
from finetune_worker.plan.children import build_preflight_argv
from finetune_worker.plan.config import AxolotlPlan

STEP_STOP_S = 10.0  # how long a cancelled job waits for its data step's thread to stop


async def off_loop[T](resources: JobResources, step: Callable[[threading.Event], T]) -> T:
    """Run a blocking step in a thread, so that the event loop (and a cancel) keeps running.

    A cancel sets the step's flag, which the step checks between chunks of what it reads
    or writes; the job waits for the thread to stop before it ends and frees the run.
    """
    cancel = resources.step_cancel = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, step, cancel)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        await asyncio.wait([future], timeout=STEP_STOP_S)
        future.add_done_callback(lambda done: done.cancelled() or done.exception())  # its Cancelled is expected
        raise
    finally:
        resources.step_cancel = None


def check_data(
    plan: AxolotlPlan, settings: WorkerSettings, evaluation: EvaluationOptions | None, cancel: threading.Event | None = None,
) -> tuple[list[DatasetCheck], str]:
    """Inline and URL datasets into the run dir, every local row checked; (the checks, the
    fingerprint that keys the prepared-data cache by content)."""
    materialise(plan.data_sources, DownloadRules.from_settings(settings), cancel)
    if evaluation is not None and evaluation.dataset.path:
        check_eval_file(evaluation.dataset.path, evaluation.dataset.format, cancel)
    inline = {source.where: source for source in plan.data_sources if source.rows is not None}
    checks = check_datasets(plan.config, inline, cancel)
    return checks, data_fingerprint(plan.config, checks, cancel)


def data_checked(checks: list[DatasetCheck]) -> dict:
    rows = sum(check.rows for check in checks)
    empty = sum(check.empty_rows for check in checks)
    note = f"; {empty} with an empty response (nothing to train on)" if empty else ""
    return events.status(
        "preparing",
        f"{rows} rows in {len(checks)} local dataset(s) parse and have the fields their type needs{note}",
        datasets={check.where: check.summary() for check in checks},
    )


async def start_preflight_standby(paths: RunPaths, child_env: dict[str, str], resources: JobResources) -> None:
    """`mode: preflight` and `mode: estimate`: start the preflight child now, so that its imports
    overlap the worker's validation; it tokenizes on `go`, and is stopped if the job ends first."""
    argv = build_preflight_argv(sys.executable, paths.config_file, paths.preflight_file, standby=True)
    standby = job_child(argv, child_env, paths.run_dir / "preflight.log", paths.run_dir / ".preflight.records", "preflight", resources)
    await standby.start(standby=True)
    resources.preflight_standby = standby


async def tokenize_as_training_would(config: dict, paths: RunPaths, child_env: dict[str, str], resources: JobResources,
                                     checks: list[DatasetCheck]) -> dict:
    """The preflight child's report: every dataset tokenized as training would, no model weights
    (the child started on standby at job receipt, when there is one)."""
    standby, resources.preflight_standby = resources.preflight_standby, None
    if standby is not None and standby.on_standby:
        paths.preflight_file.unlink(missing_ok=True)
        tool = await finish_standby(standby, resources)
        report = read_json(paths.preflight_file)
    else:
        if standby is not None:
            standby.stop()
        argv = build_preflight_argv(sys.executable, paths.config_file, paths.preflight_file)
        tool, report = await json_tool(argv, paths.preflight_file, child_env, paths.run_dir, "preflight", resources)
    if tool.returncode != 0 or report is None:
        diagnosis = diagnose(tool.returncode, tool.log_tail(), "preprocessing", None, config.get("base_model"))
        raise JobError(diagnosis.code, f"preflight failed: {diagnosis.message}", log_tail=tool.log_tail())
    empty = {check.where: check.empty_rows for check in checks}
    for dataset in report["datasets"]:
        dataset["empty_rows"] = empty.get(dataset["where"], 0)
    _add_weights(report, config, checks)
    report["total"]["empty_rows"] = sum(dataset["empty_rows"] for dataset in report["datasets"])
    return report


def preflight_events(report: dict, run_id: str, run_dir: Path, started: float, mode: str = "preflight",
                     estimate: dict | None = None) -> list[dict]:
    """The report as the job's events: one per dataset and example, the estimate's choice, then the result."""
    found = [events.status("preprocessing", _describe_dataset(dataset, report), dataset=dataset) for dataset in report["datasets"]]
    marks = "the prompt and the answers as the trainer sees them" if report.get("rl") else "[[...]] is trained on"
    found += [events.status("preprocessing", f"example {example['dataset']} row {example['row']} ({marks})", example=example)
              for example in report["examples"]]
    if estimate is not None:
        found.append(events.status("preprocessing", describe_choice(estimate)))
    extra = {"estimate": estimate} if estimate is not None else {}
    return [*found, events.result(run_id, str(run_dir), report["total"], time.monotonic() - started, mode=mode, preflight=report, **extra)]


def describe_choice(estimate: dict) -> str:
    """One line: the cheapest and the fastest GPU choice that fit (or why there is none)."""
    if estimate.get("fastest") is None:
        return f"estimate: {estimate.get('reason', 'nothing fits')}"
    parts = [f"{name}: {row['gpu']} x{row['count']}, {row['total_seconds'] / 3600:.2f} h"
             + (f", ${row['cost_usd']:.2f}" if row.get("cost_usd") is not None else "")
             for name, row in (("cheapest", estimate["cheapest"]), ("fastest", estimate["fastest"])) if row is not None]
    return f"estimate for {estimate['train_tokens']} training tokens: " + "; ".join(parts)


def _add_weights(report: dict, config: dict, checks: list[DatasetCheck]) -> None:
    """A dataset's `weight` (Axolotl samples that share of its rows, before tokenizing):
    the report's rows are the sampled ones; the rows before sampling come from the data check."""
    in_files = {check.where: check.rows for check in checks}
    for dataset in report["datasets"]:
        list_key, _, index = dataset["where"].removeprefix("args.").rstrip("]").partition("[")
        entries = config.get(list_key) or []
        entry = entries[int(index)] if index.isdigit() and int(index) < len(entries) else {}
        weight = entry.get("weight") if isinstance(entry, dict) else None
        if weight is not None:
            dataset["weight"] = weight
            dataset["rows_before_weight"] = in_files.get(dataset["where"])


def _describe_dataset(dataset: dict, report: dict) -> str:
    if "rl" in dataset:
        return _describe_preference_dataset(dataset, report)
    tokens = dataset["tokens"]
    fates = []
    if dataset["too_long"]:
        fate = "truncated" if dataset["truncated"] else "dropped"
        fates.append(f"{dataset['too_long']} longer than sequence_len {report['sequence_len']}: {fate}")
    if dataset["too_short"]:
        fates.append(f"{dataset['too_short']} too short: dropped")
    if dataset["no_trained_tokens"]:
        fates.append(f"{dataset['no_trained_tokens']} with nothing to train on")
    weighted = ""
    if "weight" in dataset:
        before = dataset.get("rows_before_weight")
        weighted = f" (weight {dataset['weight']}: {dataset['rows_read']} sampled of {before if before is not None else 'all'})"
    return (
        f"{dataset['where']}: {dataset['rows_read']} rows{weighted}, {dataset['rows_kept']} kept"
        + (f" ({'; '.join(fates)})" if fates else "")
        + f"; {tokens['total']} tokens, {tokens['trained']} trained on; "
        f"{tokens['min']}-{tokens['max']} per example (median {tokens['median']})"
    )


def _describe_preference_dataset(dataset: dict, report: dict) -> str:
    fates = ""
    if dataset["too_long"]:
        fate = {"truncate": "truncated", "raise": "training would stop"}.get(str(report["excess_length_strategy"]).lower(), "dropped")
        fates = f" ({dataset['too_long']} pairs longer than sequence_len {report['sequence_len']}: {fate}"
        if dataset["truncated"] and dataset["dropped"]:
            fates += f"; {dataset['dropped']} dropped, their prompt alone too long"
        fates += ")"
    parts = "; ".join(f"{name} {stats['min']}-{stats['max']} tokens (median {stats['median']})" for name, stats in dataset["tokens"].items())
    return f"{dataset['where']}: {dataset['rows_read']} rows, {dataset['rows_kept']} kept{fates}; {parts}"
