"""A client for a deployed endpoint, on runpod's own SDK: submit, follow, cancel."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_BASE_URL = "https://api.runpod.ai/v2"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


def job_from_config(path: Path, *, user_id: str | None, model_id: str | None, run_id: str | None, credentials: Mapping[str, str]) -> dict:
    """An Axolotl YAML becomes the `args` of a new job; a job JSON is used as it is.

    Ids given on the command line win; a YAML needs a model id (default: the file
    name) and gets a run id from the clock when none is given.
    """
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        job = dict(data.get("input", data)) if isinstance(data, dict) else {}
    else:
        job = {"args": yaml.safe_load(text) or {}}
        job.setdefault("model_id", path.stem)
        job.setdefault("run_id", time.strftime("%Y%m%d-%H%M%S"))
        job.setdefault("user_id", "me")
    for key, value in {"user_id": user_id, "model_id": model_id, "run_id": run_id}.items():
        if value:
            job[key] = value
    if credentials:
        job["credentials"] = {**(job.get("credentials") or {}), **credentials}
    return job


def estimate_job(path: Path, *, user_id: str | None, model_id: str | None, run_id: str | None,
                 credentials: Mapping[str, str]) -> dict:
    """The job of `path` as `mode: estimate`: the time and cost table for each GPU type, no training."""
    return {**job_from_config(path, user_id=user_id, model_id=model_id, run_id=run_id, credentials=credentials), "mode": "estimate"}


def connect(endpoint_id: str, env: Mapping[str, str]):
    """runpod.Endpoint for `endpoint_id`; RUNPOD_ENDPOINT_BASE_URL points it elsewhere."""
    import runpod

    api_key = env.get("RUNPOD_API_KEY")
    if not api_key:
        raise SystemExit("RUNPOD_API_KEY is not set: create a key at https://console.runpod.io/user/settings")
    runpod.endpoint_url_base = env.get("RUNPOD_ENDPOINT_BASE_URL", DEFAULT_BASE_URL)
    return runpod.Endpoint(endpoint_id, api_key=api_key)


def webhook_problem(url: str) -> str | None:
    """Why RunPod must not be given this webhook, or None: the job's final /status body
    (its result, events and run directory) travels to it, so only over https."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "https" or not parts.hostname:
        return f"the webhook must be an https:// URL (RunPod sends the job's final status, its output included, to it), not {url!r}"
    return None


def submit(endpoint, job_input: dict, execution_timeout_s: int | None = None, webhook: str | None = None) -> str:
    """POST /run. `webhook` is RunPod's own field beside `input`: RunPod POSTs the
    job's final /status body to that URL when the job ends (as `Endpoint.run` sends
    it when given the whole request, `{"input": ..., "webhook": ...}`); https only."""
    if webhook and (problem := webhook_problem(webhook)):
        raise ValueError(problem)
    body: dict[str, Any] = {"input": job_input}
    if execution_timeout_s:
        body["policy"] = {"executionTimeout": execution_timeout_s * 1000}
    if webhook:
        body["webhook"] = webhook
    reply = endpoint.rp_client.post(f"{endpoint.endpoint_id}/run", body)
    return reply["id"]


def cancel(endpoint, job_id: str) -> dict:
    return endpoint.rp_client.post(f"{endpoint.endpoint_id}/cancel/{job_id}", data=None)


def final_event(state: dict) -> dict:
    """The job's last event from a terminal /status reply."""
    status = state.get("status")
    if status == "COMPLETED":
        output = state.get("output")
        if isinstance(output, list) and output:
            return output[-1]
        return {"type": "result", "status": "completed", "output": output}
    if status == "FAILED":
        error = state.get("error")
        try:
            body = json.loads(error)
        except (TypeError, ValueError):
            body = {"code": "failed", "message": str(error)}
        return {"type": "error", **body} if isinstance(body, dict) else {"type": "error", "code": "failed", "message": str(body)}
    return {"type": "error", "code": "cancelled", "message": f"the job ended {status}", "details": [], "log_tail": []}


def follow(
    endpoint,
    job_id: str,
    emit: Callable[[dict], None],
    poll_seconds: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Print streamed events until the job ends; return its final event.

    The SDK's own Job.stream() never stops for a CANCELLED job, so this loop asks
    /stream and /status itself.
    """
    ep = endpoint.endpoint_id
    last = None
    while True:
        state = endpoint.rp_client.get(f"{ep}/stream/{job_id}")
        for chunk in state.get("stream") or []:
            last = chunk.get("output")
            emit(last)
        if state.get("status") in TERMINAL:
            final = final_event(endpoint.rp_client.get(f"{ep}/status/{job_id}"))
            if final != last:
                emit(final)  # a failed job's error never reaches /stream; a re-attach may have missed the result
            return final
        sleep(poll_seconds)


def history_job(mode: str, user_id: str, *, run_id: str | None = None, limit: int | None = None,
                offset: int | None = None, user_token: str | None = None) -> dict:
    """The input of a `runs` or `events` job (they read the volume: no args, no model_id)."""
    job: dict[str, Any] = {"user_id": user_id, "mode": mode}
    if run_id is not None:
        job["run_id"] = run_id
    if limit is not None:
        job["limit"] = limit
    if offset is not None:
        job["offset"] = offset
    if user_token:
        job["credentials"] = {"user_token": user_token}
    return job


def ask(endpoint, job_input: dict, poll_seconds: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Submit a read-only job (`runs`, `events`) and return its final event: the answer or an error."""
    job_id = submit(endpoint, job_input)
    return follow(endpoint, job_id, lambda event: None, poll_seconds=poll_seconds, sleep=sleep)
