"""A user's runs on the volume, read back: `mode: runs` and `mode: events`.

RunPod keeps a job's output for 30 minutes; the run directory keeps it for good.
Everything here only reads: no lock is taken (a live one is only looked at), no file
is written, and only the asking user's directory (`runs/<user_id>/`) is ever opened,
so another user's run and a missing one give the same answer.

A run's state:
  running      its lock is held by a live worker (host/lock.py `holder`)
  completed    result.json, or a last recorded event `result` (a preflight)
  failed       the last recorded event is an `error` (not `cancelled`)
  interrupted  cancelled, or stopped without a last event (the worker was killed)
Attempts set aside by `restart` (`<run_id>.previous-<time>`) are not listed; a run
counts them in `earlier_attempts`. A run directory (or user directory) that is a
symbolic link is never followed: it is not listed, and its events answer `run_not_found`.
`mode: runs` orders the runs by the `created` time at the head of each job.json (a
small read, not a parse of the whole file), and reads in full only the page's runs.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_worker.contract import errors
from finetune_worker.contract.job import (
    EVENTS_PAGE_DEFAULT,
    LORA_ADAPTERS,
    RUNS_PAGE_DEFAULT,
)
from finetune_worker.host.lock import holder
from finetune_worker.host.rundir import RunPaths, read_json, run_paths, through_link

EVENTS_PAGE_BYTES = 1024 * 1024  # one page of events at most (RunPod streams up to 4 MiB of them)
TAIL_BYTES = 64 * 1024  # where a run's last event and last progress are looked for
ASIDE = ".previous-"
NODE_LOCK = re.compile(r"\.node-\d+$")
HEAD_BYTES = 256  # where job.json keeps `created` (the first key the worker writes)
CREATED_AT_HEAD = re.compile(rb'^\{\s*"created"\s*:\s*(-?[0-9][0-9.eE+-]*)\s*[,}]')


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _run_names(user_dir: Path) -> list[str]:
    """The user's run ids: run directories, and locks held before a directory exists."""
    if user_dir.is_symlink():
        return []
    try:
        entries = list(os.scandir(user_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = set()
    for entry in entries:
        name = entry.name
        if name.startswith(".") or ASIDE in name:
            continue
        if name.endswith(".lock"):
            run_id = NODE_LOCK.sub("", name.removesuffix(".lock"))  # a cluster node's own lock: <run_id>.node-<k>.lock
            if run_id and not (user_dir / run_id).exists() and holder(Path(entry.path)) is not None:
                names.add(run_id)
        elif entry.is_dir(follow_symlinks=False):  # a lock's own temporary names are files
            names.add(name)
    return sorted(names)


def _created(paths: RunPaths, job: dict) -> float | None:
    """job.json's `created` (kept across attempts); else the earliest of the files a run writes first."""
    if isinstance(job.get("created"), (int, float)):
        return float(job["created"])
    times = [t for t in (_mtime(paths.job_file), _mtime(paths.output_dir), _mtime(paths.events_file)) if t is not None]
    return min(times) if times else _mtime(paths.lock_file)


def _created_cheaply(paths: RunPaths) -> float | None:
    """`created` from the head of job.json, without parsing the rest; else from the run's files."""
    try:
        with open(paths.job_file, "rb") as handle:
            head = handle.read(HEAD_BYTES)
    except OSError:
        head = b""
    if found := CREATED_AT_HEAD.match(head):
        try:
            return float(found.group(1))
        except ValueError:
            pass
    return _created(paths, {})


def _tail_events(path: Path) -> list[dict]:
    """The complete events in the last TAIL_BYTES of events.jsonl, oldest first."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - TAIL_BYTES))
            data = handle.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    if size > TAIL_BYTES:
        lines = lines[1:]  # the first one is cut
    found = []
    for line in lines[:-1]:  # the last piece has no newline yet: not a complete event
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            found.append(event)
    return found


def _method(args: dict) -> dict:
    adapter = args.get("adapter")
    method = {"method": adapter if adapter in LORA_ADAPTERS else "full"}
    if args.get("rl"):
        method["rl"] = args["rl"]
    return method


def summarize(paths: RunPaths) -> dict[str, Any]:
    """One run as `mode: runs` lists it."""
    job = read_json(paths.job_file)
    job = job if isinstance(job, dict) else {}
    args = job.get("args") if isinstance(job.get("args"), dict) else {}
    result = read_json(paths.result_file)
    result = result if isinstance(result, dict) else None
    trained = read_json(paths.trained_file)
    tail = _tail_events(paths.events_file)
    last = tail[-1] if tail else None
    progress = next((e for e in reversed(tail) if e.get("type") == "progress"), None)
    owner = holder(paths.lock_file)
    failure = None
    if owner is not None:
        state = "running"
    elif result is not None or (last and last.get("type") == "result"):
        state = "completed"
        result = result or last
    elif last and last.get("type") == "error":
        state = "interrupted" if last.get("code") == errors.CANCELLED else "failed"
        failure = {"code": last.get("code"), "message": last.get("message")}
    else:
        state = "interrupted"
    metrics = (result or {}).get("metrics") or ((trained or {}).get("metrics") if isinstance(trained, dict) else None) or {}
    steps, loss = metrics.get("total_steps"), metrics.get("final_loss")
    if progress is not None and (state != "completed" or steps is None):  # how far it got
        steps, loss = progress.get("step"), progress.get("loss")
    evaluation = (result or {}).get("evaluation")
    hub = (result or {}).get("hub")
    finished = None
    if state == "completed":
        finished = _mtime(paths.result_file) or _mtime(paths.events_file)
    elif state != "running":
        finished = _mtime(paths.events_file)
    summary: dict[str, Any] = {
        "run_id": paths.run_dir.name,
        "state": state,
        "mode": job.get("mode") or (result or {}).get("mode") or "train",
        "model_id": job.get("model_id"),
        "created": _iso(_created(paths, job)),
        "finished": _iso(finished),
        "base_model": args.get("base_model"),
        **(_method(args) if args else {"method": None}),
        "steps": steps,
        "total_steps": metrics.get("total_steps") or (progress or {}).get("total_steps"),
        "final_loss": loss,
        "evaluation": None if not isinstance(evaluation, dict) else {
            "examples": evaluation.get("examples"), "delta": evaluation.get("delta"), "published": (result or {}).get("published"),
        },
        "hub_url": hub.get("url") if isinstance(hub, dict) else None,
        "continue_from": job.get("continue_from"),
        "earlier_attempts": len(list(paths.run_dir.parent.glob(f"{paths.run_dir.name}{ASIDE}*"))),
    }
    if failure:
        summary["failure"] = failure
    return summary


def list_runs(runs_dir: Path, user_id: str, limit: int | None, offset: int | None) -> dict[str, Any]:
    """The `result` of `mode: runs`: newest first, one page (`offset` runs skipped)."""
    limit, offset = limit or RUNS_PAGE_DEFAULT, offset or 0
    user_dir = runs_dir / user_id
    dated = []
    for run_id in _run_names(user_dir):
        paths = run_paths(runs_dir, user_id, run_id)
        dated.append((_created_cheaply(paths) or 0.0, run_id, paths))
    dated.sort(key=lambda item: (item[0], item[1]), reverse=True)
    page = dated[offset:offset + limit]
    following = offset + len(page)
    return {
        "type": "result",
        "mode": "runs",
        "user_id": user_id,
        "runs": [summarize(paths) for _, _, paths in page],
        "total": len(dated),
        "offset": offset,
        "limit": limit,
        "next_offset": following if following < len(dated) else None,
    }


def read_events(runs_dir: Path, user_id: str, run_id: str, limit: int | None, offset: int | None) -> dict[str, Any]:
    """The `result` of `mode: events`: the run's recorded events from index `offset`,
    at most `limit` of them and about EVENTS_PAGE_BYTES; `next_offset` asks for the rest.
    An event still being written (no newline yet) waits for the next page."""
    limit, offset = limit or EVENTS_PAGE_DEFAULT, offset or 0
    paths = run_paths(runs_dir, user_id, run_id)
    if through_link(paths.run_dir) or (not paths.run_dir.is_dir() and holder(paths.lock_file) is None):
        raise errors.run_not_found(user_id, run_id)
    page: list[dict] = []
    size, index, more = 0, 0, False
    try:
        with open(paths.events_file, "rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    break
                if index < offset:
                    index += 1
                    continue
                if len(page) >= limit or (page and size + len(line) > EVENTS_PAGE_BYTES):
                    more = True
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"type": "unreadable", "line": index}  # keeps the numbering
                page.append(event)
                size += len(line)
                index += 1
    except FileNotFoundError:
        pass
    state = summarize(paths)["state"]
    return {
        "type": "result",
        "mode": "events",
        "user_id": user_id,
        "run_id": run_id,
        "state": state,
        "events": page,
        "offset": offset,
        "next_offset": offset + len(page),
        "more": more,
    }
