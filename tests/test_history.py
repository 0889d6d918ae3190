"""`mode: runs` and `mode: events`: a user's runs read back from the volume, made by hand here."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import pytest

from conftest import TRAINING_PROGRAMS, collect, live_processes, training_pids
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.job import parse_job_input
from finetune_worker.host import history
from finetune_worker.host.hardware import CPU_ONLY
from finetune_worker.host.lock import RunLock
from finetune_worker.pipeline import run_job

DAY = 86400.0


def make_run(runs: Path, user: str, run_id: str, *, created: float, events: list[dict], job: dict | None = None,
             result: dict | None = None, trained: dict | None = None) -> Path:
    run_dir = runs / user / run_id
    (run_dir / "output").mkdir(parents=True)
    record = {"created": created, "user_id": user, "model_id": "m", "run_id": run_id, "mode": "train",
              "args": {"base_model": "org/base", "adapter": "lora"}, **(job or {})}
    (run_dir / "job.json").write_text(json.dumps(record))
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if result is not None:
        (run_dir / "result.json").write_text(json.dumps(result))
    if trained is not None:
        (run_dir / "trained.json").write_text(json.dumps(trained))
    return run_dir


def progress(step: int, loss: float, total: int = 10) -> dict:
    return {"type": "progress", "step": step, "total_steps": total, "loss": loss}


RESULT = {
    "type": "result", "status": "completed", "run_id": "done", "output_dir": "/x", "duration_seconds": 9.5,
    "metrics": {"total_steps": 10, "final_loss": 0.5}, "hub": {"repo_id": "me/m", "url": "https://huggingface.co/me/m"},
    "evaluation": {"examples": 5, "base": {"rouge1": 0.1}, "finetuned": {"rouge1": 0.4}, "delta": {"rouge1": 0.3}}, "published": True,
}


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """alice: done (completed, 4 days ago), broke (failed, 3), killed (interrupted, 2),
    live (running, 1, its lock held), cont (a continuation, now); bob: secret."""
    runs = tmp_path / "runs"
    now = time.time()
    make_run(runs, "alice", "done", created=now - 4 * DAY, result=RESULT, trained={"metrics": RESULT["metrics"]},
             events=[{"type": "status", "stage": "validating", "message": "v"}, progress(10, 0.5), RESULT])
    make_run(runs, "alice", "broke", created=now - 3 * DAY, job={"args": {"base_model": "org/b", "rl": "dpo"}},
             events=[progress(3, 1.25), {"type": "error", "code": "out_of_memory", "message": "too big", "error": "{}"}])
    make_run(runs, "alice", "killed", created=now - 2 * DAY, events=[progress(4, 0.9)])
    make_run(runs, "alice", "live", created=now - DAY, events=[progress(7, 0.7)])
    make_run(runs, "alice", "cont", created=now, job={"continue_from": "done", "args": {"base_model": "org/base"}}, events=[])
    # an attempt set aside by restart, and the lock of a worker that died
    make_run(runs, "alice", "done.previous-20260101-000000", created=now + DAY, events=[])
    (runs / "alice" / "killed.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7, "token": "t"}))
    (runs / "alice" / "live.lock.stale-abc").write_text("{}")  # a lock's temporary names are not runs
    make_run(runs, "bob", "secret", created=now, events=[progress(1, 2.0)])
    return runs


@pytest.fixture
def live_lock(runs: Path):
    lock = RunLock(runs / "alice" / "live.lock", job_id="live")
    lock.acquire()
    yield lock
    lock.release()


def test_runs_lists_the_users_runs_newest_first_with_their_state(runs, live_lock):
    answer = history.list_runs(runs, "alice", None, None)
    assert answer["type"] == "result" and answer["mode"] == "runs"
    listed = {r["run_id"]: r for r in answer["runs"]}
    assert [r["run_id"] for r in answer["runs"]] == ["cont", "live", "killed", "broke", "done"]
    assert answer["total"] == 5 and answer["next_offset"] is None
    done = listed["done"]
    assert done["state"] == "completed" and done["steps"] == 10 and done["final_loss"] == 0.5
    assert done["hub_url"] == "https://huggingface.co/me/m" and done["method"] == "lora" and done["base_model"] == "org/base"
    assert done["evaluation"] == {"examples": 5, "delta": {"rouge1": 0.3}, "published": True}
    assert done["earlier_attempts"] == 1 and done["finished"].endswith("Z") and done["created"] < done["finished"]
    broke = listed["broke"]
    assert broke["state"] == "failed" and broke["failure"] == {"code": "out_of_memory", "message": "too big"}
    assert broke["method"] == "full" and broke["rl"] == "dpo" and broke["steps"] == 3 and broke["final_loss"] == 1.25
    assert listed["killed"]["state"] == "interrupted", "a lock whose process is gone is not a running run"
    assert listed["killed"]["steps"] == 4
    assert listed["live"]["state"] == "running" and listed["live"]["finished"] is None and listed["live"]["steps"] == 7
    assert listed["cont"]["continue_from"] == "done" and listed["done"]["continue_from"] is None
    assert "secret" not in listed, "another user's runs are never listed"


def test_reading_never_takes_or_touches_a_lock(runs, live_lock):
    before = (runs / "alice" / "killed.lock").read_text()
    history.list_runs(runs, "alice", None, None)
    history.read_events(runs, "alice", "live", None, None)
    assert (runs / "alice" / "killed.lock").read_text() == before, "a stale lock is left to the next job to take over"
    assert json.loads((runs / "alice" / "live.lock").read_text())["token"] == live_lock.token


def test_runs_pages_with_limit_and_offset(runs):
    first = history.list_runs(runs, "alice", 2, None)
    assert [r["run_id"] for r in first["runs"]] == ["cont", "live"] and first["next_offset"] == 2
    second = history.list_runs(runs, "alice", 2, first["next_offset"])
    assert [r["run_id"] for r in second["runs"]] == ["killed", "broke"] and second["next_offset"] == 4
    last = history.list_runs(runs, "alice", 2, 4)
    assert [r["run_id"] for r in last["runs"]] == ["done"] and last["next_offset"] is None
    assert history.list_runs(runs, "alice", 2, 50)["runs"] == []


def test_a_user_without_runs_gets_an_empty_list(runs):
    answer = history.list_runs(runs, "carol", None, None)
    assert answer["runs"] == [] and answer["total"] == 0


def test_events_from_an_offset_in_bounded_pages(runs):
    page = history.read_events(runs, "alice", "done", 2, None)
    assert [e["type"] for e in page["events"]] == ["status", "progress"] and page["more"] and page["next_offset"] == 2
    rest = history.read_events(runs, "alice", "done", None, page["next_offset"])
    assert rest["events"] == [RESULT] and not rest["more"] and rest["next_offset"] == 3 and rest["state"] == "completed"
    assert history.read_events(runs, "alice", "done", None, 3)["events"] == []


def test_an_event_still_being_written_waits_for_the_next_page(runs):
    events = runs / "alice" / "killed" / "events.jsonl"
    with open(events, "a") as handle:
        handle.write('{"type": "stat')
    page = history.read_events(runs, "alice", "killed", None, 0)
    assert len(page["events"]) == 1 and page["next_offset"] == 1


def test_events_pages_stop_near_a_megabyte(runs):
    big = {"type": "warning", "message": "x" * 300_000}
    make_run(runs, "alice", "loud", created=time.time(), events=[big] * 5)
    page = history.read_events(runs, "alice", "loud", None, None)
    assert len(page["events"]) == 3 and page["more"] and page["next_offset"] == 3


def test_another_users_run_reads_exactly_like_a_missing_one(runs):
    answers = []
    for run_id in ("secret", "nothing-here"):
        with pytest.raises(JobError) as caught:
            history.read_events(runs, "alice", run_id, None, None)
        answers.append((caught.value.code, caught.value.message.replace(run_id, "<id>")))
    assert answers[0] == answers[1] and answers[0][0] == "run_not_found"
    assert history.read_events(runs, "bob", "secret", None, None)["events"] == [progress(1, 2.0)]


def test_the_runs_page_is_ordered_by_the_head_of_job_json_and_reads_only_the_page(runs, monkeypatch):
    opened = []
    real = history.read_json
    monkeypatch.setattr(history, "read_json", lambda path: opened.append(path) or real(path))
    page = history.list_runs(runs, "alice", 2, 0)
    assert [r["run_id"] for r in page["runs"]] == ["cont", "live"] and page["total"] == 5
    assert {p.parent.name for p in opened} == {"cont", "live"}, "a job.json outside the page was parsed"


def test_a_run_dir_written_before_created_was_recorded_is_dated_by_its_files(runs):
    run_dir = make_run(runs, "dave", "old", created=0, events=[progress(1, 1.0)])
    record = json.loads((run_dir / "job.json").read_text())
    del record["created"]
    (run_dir / "job.json").write_text(json.dumps(record))
    os.utime(run_dir / "output", (1_700_000_000, 1_700_000_000))
    assert history.list_runs(runs, "dave", None, None)["runs"][0]["created"] == "2023-11-14T22:13:20Z"


# ------------------------------------------------------------------ the contract
def parse(raw: dict):
    return parse_job_input(raw, 1 << 20)


def test_history_modes_need_no_args_and_refuse_what_only_a_training_uses():
    job, problems = parse({"user_id": "u", "mode": "runs", "limit": 10})
    assert problems == [] and job.args is None and job.limit == 10
    job, problems = parse({"user_id": "u", "mode": "events", "run_id": "r", "offset": 5})
    assert problems == [] and job.offset == 5
    _, problems = parse({"user_id": "u", "mode": "runs", "model_id": "m", "args": {}, "restart": True, "run_id": "r",
                         "credentials": {"hf_token": "hf_x"}})
    assert sorted(p.path for p in problems) == ["args", "credentials.hf_token", "model_id", "restart", "run_id"]
    _, problems = parse({"user_id": "u", "mode": "events"})
    assert [p.path for p in problems] == ["run_id"]
    _, problems = parse({"user_id": "u", "mode": "runs", "limit": 500})
    assert [str(p) for p in problems] == ["limit: at most 200 for mode 'runs'"]
    # a number sent as a string is held to the same cap once parsed
    for limit in ("1000", " 201 ", 201.0):
        _, problems = parse({"user_id": "u", "mode": "runs", "limit": limit})
        assert [str(p) for p in problems] == ["limit: at most 200 for mode 'runs'"], (limit, problems)
    _, problems = parse({"user_id": "u", "mode": "events", "run_id": "r", "limit": "5000"})
    assert [p.path for p in problems] == ["limit"] and "1000" in problems[0].message
    _, problems = parse({"user_id": "u", "mode": "events", "run_id": "r.previous-1"})
    assert [p.path for p in problems] == ["run_id"], "a set-aside attempt is not a run id"


def test_a_training_still_needs_its_ids_and_args_and_refuses_paging():
    _, problems = parse({"user_id": "u", "limit": 3})
    assert sorted(str(p) for p in problems) == [
        "args: required field is missing", "limit: only used by mode 'runs' or 'events'",
        "model_id: required field is missing", "run_id: required field is missing",
    ]


# ------------------------------------------------------------------ through the pipeline
def answer_and_children(job: dict, env: dict, marker: str) -> tuple[list[dict], list[int]]:
    """The job's events, and the training children alive when its answer came."""

    async def run():
        evs, alive = [], []
        async for event in run_job(job, env=env, hardware=CPU_ONLY):
            evs.append(event)
            if event["type"] in ("result", "error"):
                alive = live_processes(marker, TRAINING_PROGRAMS, parent=os.getpid())
        return evs, alive

    return asyncio.run(run())


def test_the_modes_answer_through_the_pipeline_without_a_lock_or_a_child(env, volume):
    runs = volume / "runs"
    make_run(runs, "hist-user", "r1", created=time.time(), events=[progress(2, 1.5)])
    lock = runs / "hist-user" / "r1.lock"
    marker = str(runs / "hist-user")
    collect({"user_id": "hist-user", "mode": "runs"}, env)  # imports
    started = time.monotonic()
    listed, alive = answer_and_children({"user_id": "hist-user", "mode": "runs"}, env, marker)
    assert time.monotonic() - started < 2 and alive == []
    read, alive = answer_and_children({"user_id": "hist-user", "mode": "events", "run_id": "r1"}, env, marker)
    assert alive == []
    assert listed[-1]["type"] == "result" and [r["run_id"] for r in listed[-1]["runs"]] == ["r1"]
    assert read[-1]["events"] == [progress(2, 1.5)]
    assert not lock.exists() and training_pids("hist-user") == []
    assert (runs / "hist-user" / "r1" / "events.jsonl").read_text().count("\n") == 1, "reading records nothing"
    missing = collect({"user_id": "hist-user", "mode": "events", "run_id": "r2"}, env)
    assert missing[-1]["type"] == "error" and missing[-1]["code"] == "run_not_found"
    refused = collect({"user_id": "hist-user", "mode": "runs", "args": {"base_model": "x"}}, env)
    assert refused[-1]["code"] == "invalid_input" and "args: not used by mode 'runs'" in refused[-1]["details"][0]


def test_the_user_token_check_comes_first(env, volume):
    import jwt

    secret = "s" * 32
    make_run(volume / "runs", "tok-user", "r1", created=time.time(), events=[])
    guarded = {**env, "FINETUNE_USER_TOKEN_SECRET": secret}
    refused = collect({"user_id": "tok-user", "mode": "runs"}, guarded)
    assert refused[-1]["code"] == "auth_error"
    token = jwt.encode({"sub": "tok-user", "exp": int(time.time()) + 60}, secret, "HS256")
    other = jwt.encode({"sub": "someone-else", "exp": int(time.time()) + 60}, secret, "HS256")
    assert collect({"user_id": "tok-user", "mode": "events", "run_id": "r1", "credentials": {"user_token": other}}, guarded)[-1]["code"] == "auth_error"
    listed = collect({"user_id": "tok-user", "mode": "runs", "credentials": {"user_token": token}}, guarded)
    assert [r["run_id"] for r in listed[-1]["runs"]] == ["r1"]


def test_the_published_schema_says_which_fields_each_mode_takes():
    import jsonschema

    from finetune_worker.contract.schema import job_input_schema

    validator = jsonschema.Draft202012Validator(job_input_schema())
    training = json.loads((Path(__file__).parents[1] / "test_input.json").read_text())["input"]
    assert validator.is_valid(training)
    assert not validator.is_valid({k: v for k, v in training.items() if k != "args"})
    assert validator.is_valid({"user_id": "u", "mode": "runs", "limit": 10, "offset": 0})
    assert validator.is_valid({"user_id": "u", "mode": "events", "run_id": "r", "credentials": {"user_token": "t"}})
    assert not validator.is_valid({"user_id": "u", "mode": "events"})
    assert not validator.is_valid({"user_id": "u", "mode": "runs", "args": {}})
