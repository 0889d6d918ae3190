"""The events a job yields (see docs/job-reference.md, "Events")."""

from __future__ import annotations

import json
from typing import Any

from finetune_worker.contract.errors import JobError

STAGES = ("validating", "preparing", "downloading", "preprocessing", "training", "evaluating", "exporting", "publishing", "generating")


def status(stage: str, message: str, **fields: Any) -> dict:
    return {"type": "status", "stage": stage, "message": message, **fields}


def warning(message: str) -> dict:
    return {"type": "warning", "message": message}


def checkpoint(step: int, path: str) -> dict:
    return {"type": "checkpoint", "step": step, "path": path}


def storage(what: str, uri: str, sent_bytes: int, seconds: float, **fields: Any) -> dict:
    """Something uploaded to the run's bucket (a checkpoint, the outputs)."""
    return {"type": "storage", "what": what, "uri": uri, "bytes": sent_bytes, "seconds": seconds, **fields}


def evaluation(step: int | None, metrics: dict) -> dict:
    return {"type": "eval", "step": step, **metrics}


def generation(index: int, prompt: Any, completion: str, tokens: int, finish_reason: str) -> dict:
    """One answer of a generate job, as soon as its batch finishes."""
    return {"type": "generation", "index": index, "prompt": prompt, "completion": completion, "tokens": tokens, "finish_reason": finish_reason}


def result(run_id: str, output_dir: str, metrics: dict, duration_seconds: float, **fields: Any) -> dict:
    return {
        "type": "result",
        "status": "completed",
        "run_id": run_id,
        "output_dir": output_dir,
        "metrics": metrics,
        "hub": fields.pop("hub", None),
        "duration_seconds": round(duration_seconds, 2),
        **fields,
    }


def error(exc: JobError) -> dict:
    body = {"code": exc.code, "message": exc.message, "details": exc.details, "log_tail": exc.log_tail}
    # RunPod marks a streamed job FAILED when a chunk has an "error" key; it keeps
    # only that string, so it carries the whole error as JSON.
    return {"type": "error", **body, "error": json.dumps(body)}
