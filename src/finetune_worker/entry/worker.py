"""The RunPod side: the generator handler and the worker's start-up."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from finetune_worker.host.children import request_shutdown
from finetune_worker.pipeline import run_job

# Events a client polling /status should see as the job's latest state.
STATUS_EVENTS = ("status", "progress")
# RunPod's SDK logs every streamed chunk and job at DEBUG; keep it at INFO.
QUIET_SDK_LEVELS = ("", "NOTSET", "TRACE", "DEBUG")


def on_runpod(env=os.environ) -> bool:
    return bool(env.get("RUNPOD_WEBHOOK_GET_JOB"))


# RunPod keeps every streamed chunk in the aggregated output (10 MB at most): past
# this many bytes only the events that matter at the end are still streamed (all of
# them stay in the run's events.jsonl).
AGGREGATE_BUDGET_BYTES = 4 * 1024 * 1024
DROPPABLE_EVENTS = ("progress", "checkpoint", "eval", "warning", "status")


def make_handler(send_progress: Callable[[dict, Any], None] | None = None, chain_sigterm: bool = True, launch: str = "machine"):
    """The async generator handler RunPod iterates; `send_progress` feeds /status.
    `chain_sigterm=False`: the caller handles SIGTERM itself (the local CLI);
    `launch="cluster"`: one node of a cluster (`finetune-worker cluster`)."""

    async def handler(job: dict) -> AsyncIterator[dict]:
        if chain_sigterm:
            _chain_sigterm()
        streamed = 0
        async for event in run_job(job.get("input"), launch=launch):
            if send_progress and event["type"] in STATUS_EVENTS:
                send_progress(job, event)
            size = len(json.dumps(event))
            if streamed + size > AGGREGATE_BUDGET_BYTES and event["type"] in DROPPABLE_EVENTS:
                continue
            streamed += size
            yield event

    return handler


def _chain_sigterm() -> None:
    """Make SIGTERM stop the training tree before the SDK's own shutdown runs.

    The SDK installs its handler when its job loop starts (after our start-up code),
    and on SIGTERM it only waits for running jobs, so we put ours in front of it
    the first time a job runs (always on the main thread, in the SDK's loop).
    """
    current = signal.getsignal(signal.SIGTERM)
    if getattr(current, "finetune_worker", False):
        return

    def on_sigterm(signum, frame):
        request_shutdown()
        if callable(current):
            current(signum, frame)
        else:
            raise SystemExit(128 + signum)

    on_sigterm.finetune_worker = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, on_sigterm)


def _quiet_sdk_logs() -> None:
    for name in ("RUNPOD_LOG_LEVEL", "RUNPOD_DEBUG_LEVEL"):
        if os.environ.get(name, "").upper() in QUIET_SDK_LEVELS:
            os.environ[name] = "INFO"


def _warm_imports() -> None:
    """Import Axolotl's schema before taking jobs, so validation takes milliseconds."""
    started = time.monotonic()
    from finetune_worker.checks import axolotl_schema

    axolotl_schema.known_keys()
    axolotl_schema.builtin_dataset_types()
    print(f"finetune-worker: Axolotl schema loaded in {time.monotonic() - started:.1f}s", flush=True)


def serving_local_api(env=os.environ) -> bool:
    """The SDK's local API server (`--rp_serve_api`), or a realtime endpoint."""
    return "--rp_serve_api" in sys.argv or bool(env.get("RUNPOD_REALTIME_PORT"))


def start() -> None:
    """The RunPod job loop (the image's entry, `src/handler.py`, calls it on RunPod)."""
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    _quiet_sdk_logs()
    from finetune_worker.contract.settings import SettingsInvalid, WorkerSettings

    try:
        WorkerSettings.from_env(os.environ)
    except SettingsInvalid as exc:
        print(f"finetune-worker: cannot start, a worker setting is invalid: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)

    import runpod

    # Axolotl's schema is imported beside the job loop, not before it: the worker takes its
    # first job sooner, a job that needs no Axolotl (mode runs, events) is answered at once,
    # and a training's standby child starts at receipt and imports while this one does.
    # A job that needs the schema before it is loaded waits for it (Python's import lock).
    threading.Thread(target=_warm_imports, name="warm-imports", daemon=True).start()
    runpod.serverless.start(
        {
            "handler": make_handler(runpod.serverless.progress_update if on_runpod() else None),
            "return_aggregate_stream": True,
        }
    )
