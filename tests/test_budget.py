"""A job's budget (max_cost, max_hours; the operator's FINETUNE_MAX_COST and FINETUNE_MAX_HOURS):
refused before anything downloads when the estimate for this worker is over it, stopped at a
checkpoint when the measured pace would pass it."""

from __future__ import annotations

import json

import pytest

from conftest import collect, make_job, tiny_args
from finetune_worker.contract.job import JobInput
from finetune_worker.contract.settings import WorkerSettings
from finetune_worker.host.hardware import CPU_ONLY, Hardware
from finetune_worker.host.rundir import is_complete_checkpoint
from finetune_worker.sizing.budget import job_budget, worker_price
from finetune_worker.sizing.gpus import BY_NAME

H100 = "NVIDIA H100 80GB HBM3"
TWO_H100 = Hardware(gpu_count=2, gpu_names=(H100,) * 2, gpu_memory_bytes=(80 * 2**30,) * 2, bf16=True, compute_capability=(9, 0))
ONE_H100 = Hardware(gpu_count=1, gpu_names=(H100,), gpu_memory_bytes=(80 * 2**30,), bf16=True, compute_capability=(9, 0))


def settings(tmp_path, **env) -> WorkerSettings:
    return WorkerSettings.from_env({"BASE_VOLUME": str(tmp_path), **env})


def job(**fields) -> JobInput:
    return JobInput(user_id="u", model_id="m", run_id="r", args={"base_model": "x"}, **fields)


def test_the_budget_is_the_smaller_of_the_jobs_and_the_operators_at_this_workers_price(tmp_path):
    budget, problems = job_budget(job(max_cost=5.0, max_hours=2.0), settings(tmp_path, FINETUNE_MAX_COST="3", FINETUNE_MAX_HOURS="1"), TWO_H100)
    assert problems == [] and budget.max_cost == 3.0 and budget.max_seconds == 3600
    assert budget.price_per_hour == pytest.approx(2 * BY_NAME[H100].price_per_hour)  # every GPU of the worker
    assert "max_cost $3 (FINETUNE_MAX_COST)" in budget.said and "max_hours 1 (FINETUNE_MAX_HOURS)" in budget.said
    hour = budget.overrun(3600.0 * 1.5)
    assert hour.startswith("1.5 h, over max_hours 1 and $") and hour.endswith(" an hour, over max_cost $3")
    assert budget.overrun(60.0) is None
    priced = settings(tmp_path, FINETUNE_GPU_PRICES=json.dumps({H100: 10.0, "cpu": 0.5}))
    assert worker_price(priced, TWO_H100) == 20.0 and worker_price(priced, CPU_ONLY) == 0.5
    cheap, _ = job_budget(job(max_cost=1.0), priced, TWO_H100)
    assert cheap.overrun(181.0) == "$1.006 at $20 an hour, over max_cost $1" and cheap.overrun(179.0) is None


def test_no_budget_without_one_and_the_operators_max_hours_alone_stays_a_deadline(tmp_path):
    assert job_budget(job(), settings(tmp_path, FINETUNE_MAX_HOURS="1"), ONE_H100) == (None, [])


def test_a_cost_cannot_be_kept_without_a_price(tmp_path):
    budget, problems = job_budget(job(max_cost=1.0), settings(tmp_path), CPU_ONLY)
    assert budget is None and problems[0].path == "max_cost" and "FINETUNE_GPU_PRICES" in problems[0].message
    budget, problems = job_budget(job(max_hours=1.0), settings(tmp_path), CPU_ONLY)
    assert problems == [] and budget.max_seconds == 3600 and budget.price_per_hour is None


def test_a_job_with_a_cost_on_a_worker_without_a_price_is_refused_before_anything_runs(tiny, env):
    events = collect(make_job(tiny_args(tiny), max_cost=1.0), env)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "invalid_config"
    assert any(d.startswith("max_cost: this worker has no price for a CPU worker") for d in events[-1]["details"])


def test_the_reading_modes_take_no_budget(env):
    events = collect({"user_id": "tester", "mode": "runs", "max_cost": 1.0}, env)
    assert any(d.startswith("max_cost: not used by mode 'runs'") for d in events[-1]["details"])


@pytest.mark.training
def test_an_estimate_over_the_budget_is_refused_before_the_model_downloads(tiny, env):
    """On a (pretend) H100 worker whose operator caps each job at a hundredth of a cent."""
    events = collect(make_job(tiny_args(tiny, max_steps=50)), {**env, "FINETUNE_MAX_COST": "0.0001"}, hardware=ONE_H100)
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "budget_exceeded", error
    assert "over max_cost $0.0001" in error["message"] and "nothing was downloaded or trained" in error["message"]
    assert any(d.startswith(f"gpu: {H100}") for d in error["details"]) and any(d.startswith("total_seconds:") for d in error["details"])
    assert not any(e["type"] == "status" and e.get("stage") == "training" for e in events)


@pytest.mark.training
def test_a_training_whose_pace_breaks_the_budget_stops_at_a_checkpoint(tiny, env, volume):
    """A CPU worker: the job's time so far plus the training's ETA is over max_hours (about 11 s)."""
    job_input = make_job(tiny_args(tiny, max_steps=60, save_steps=1000), max_hours=0.003)
    events = collect(job_input, env)
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "budget_exceeded", error
    warned = [e for e in events if e["type"] == "warning" and "stopping at a checkpoint" in e["message"]]
    assert warned and "over max_hours 0.003" in warned[0]["message"]
    saved = [e["step"] for e in events if e["type"] == "checkpoint"]
    assert len(saved) == 1 and saved[0] < 60  # save_steps would have saved none before step 60
    checkpoint = volume / "runs" / "tester" / job_input["run_id"] / "output" / f"checkpoint-{saved[0]}"
    assert is_complete_checkpoint(checkpoint)
    assert f"stopped at the checkpoint of step {saved[0]}" in error["message"] and "resubmit the same run_id" in error["message"]
