"""The RunPod handler wrapper: /status updates and the bound on aggregated output."""

import asyncio
import json

from finetune_worker.entry import worker


def drive(handler, job):
    async def run():
        return [event async for event in handler(job)]

    return asyncio.run(run())


def test_aggregate_output_stays_under_budget_and_the_result_always_arrives(monkeypatch):
    async def flood(_input, launch="machine"):
        for step in range(200_000):
            yield {"type": "progress", "step": step, "total_steps": 200_000, "loss": 0.5, "padding": "x" * 40}
        yield {"type": "result", "status": "completed", "metrics": {}}

    monkeypatch.setattr(worker, "run_job", flood)
    sent = []
    events = drive(worker.make_handler(lambda job, event: sent.append(event)), {"id": "j", "input": {}})
    size = sum(len(json.dumps(e)) for e in events)
    assert size <= worker.AGGREGATE_BUDGET_BYTES + 1000
    assert size < 10 * 1024 * 1024  # RunPod's payload limit
    assert events[-1]["type"] == "result"
    assert len(sent) == 200_000  # /status still gets every progress update


def test_status_and_progress_events_feed_status_updates(monkeypatch):
    async def short(_input, launch="machine"):
        yield {"type": "status", "stage": "validating", "message": "m"}
        yield {"type": "warning", "message": "w"}
        yield {"type": "progress", "step": 1}
        yield {"type": "result", "status": "completed"}

    monkeypatch.setattr(worker, "run_job", short)
    sent = []
    events = drive(worker.make_handler(lambda job, event: sent.append((job["id"], event["type"]))), {"id": "j1", "input": {}})
    assert [e["type"] for e in events] == ["status", "warning", "progress", "result"]
    assert sent == [("j1", "status"), ("j1", "progress")]


def test_sdk_debug_logging_is_turned_down(monkeypatch):
    monkeypatch.setenv("RUNPOD_LOG_LEVEL", "DEBUG")
    monkeypatch.delenv("RUNPOD_DEBUG_LEVEL", raising=False)
    worker._quiet_sdk_logs()
    import os

    assert os.environ["RUNPOD_LOG_LEVEL"] == "INFO"
    assert os.environ["RUNPOD_DEBUG_LEVEL"] == "INFO"
