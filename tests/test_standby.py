"""The standby children (training, and the preflight's): started at job receipt, work only on "go", never outlive their job."""

import asyncio
import json
import os
import subprocess
import sys

from conftest import live_processes, make_job, tiny_args
from finetune_worker.host.hardware import CPU_ONLY
from finetune_worker.pipeline import run_job

TRAINING_STANDBY = ("finetune_worker.run.standby",)
PREFLIGHT_STANDBY = ("finetune_worker.data.preflight",)


def standby_children(marker: str, programs: tuple[str, ...] = TRAINING_STANDBY) -> list[int]:
    return live_processes(marker, programs, parent=os.getpid())


def run_and_watch(job: dict, env: dict, marker: str, programs: tuple[str, ...] = TRAINING_STANDBY) -> tuple[list[dict], list[int], list[int]]:
    """(events, standby children alive when the last event arrived, those alive after the job)."""

    async def run():
        evs, at_end = [], []
        async for event in run_job(job, env=env, hardware=CPU_ONLY):
            evs.append(event)
            if event["type"] in ("result", "error"):
                at_end = standby_children(marker, programs)
        return evs, at_end

    evs, at_end = asyncio.run(run())
    return evs, at_end, standby_children(marker, programs)


def test_a_job_failing_validation_stops_the_standby_it_started(tiny, env, volume):
    job = make_job(tiny_args(tiny, lerning_rate=1e-3))
    marker = str(volume / "runs" / "tester" / job["run_id"] / "config.yaml")
    evs, at_end, after = run_and_watch(job, env, marker)
    assert evs[-1]["code"] == "invalid_config"
    assert at_end, "a training job starts its training child before validating"
    assert after == [], "and stops it when the job ends without training"
    assert not (volume / "runs" / "tester" / job["run_id"] / "train.log").exists()


def test_a_bad_dataset_row_found_after_validation_stops_the_standby(tiny, env, volume):
    data = volume / "standby-bad.jsonl"  # datasets must be on the volume
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n" + json.dumps({"instruction": "q"}) + "\n")
    job = make_job(tiny_args(tiny, datasets=[{"path": str(data), "type": "alpaca", "ds_type": "json"}]))
    marker = str(volume / "runs" / "tester" / job["run_id"] / "config.yaml")
    evs, at_end, after = run_and_watch(job, env, marker)
    assert evs[-1]["code"] == "dataset_error" and "line 2" in evs[-1]["message"]
    assert at_end and after == []


def test_no_standby_when_the_job_will_not_run_axolotl_train_in_one_process(tiny, env, volume):
    job = make_job(tiny_args(tiny, lerning_rate=1e-3), num_processes=2)
    marker = str(volume / "runs" / "tester" / job["run_id"] / "config.yaml")
    evs, at_end, after = run_and_watch(job, env, marker)
    assert evs[-1]["type"] == "error"
    assert at_end == [] and after == []


def test_a_preflight_starts_its_own_standby_not_a_trainings_and_a_failing_job_stops_it(tiny, env, volume):
    """A preflight's child imports Axolotl while the worker validates (its own standby, which
    tokenizes on go); a job that fails validation ends it, and no training child ever starts."""
    job = make_job(tiny_args(tiny, lerning_rate=1e-3), mode="preflight")
    run_dir = volume / "runs" / "tester" / job["run_id"]
    marker = str(run_dir / "config.yaml")
    evs, preflights, after = run_and_watch(job, env, marker, PREFLIGHT_STANDBY)
    assert evs[-1]["code"] == "invalid_config"
    assert len(preflights) == 1 and after == [] and not (run_dir / "preflight.json").exists()
    evs, trainings, _ = run_and_watch({**job, "run_id": job["run_id"] + "-2"}, env, marker.replace(job["run_id"], job["run_id"] + "-2"))
    assert evs[-1]["code"] == "invalid_config" and trainings == []


def test_standby_without_go_exits_quietly_and_trains_nothing(tmp_path):
    config = tmp_path / "run" / "config.yaml"  # never written: the job failed its checks
    child = subprocess.run(
        [sys.executable, "-m", "finetune_worker.run.standby", str(config)],
        input=b"", capture_output=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"},
    )
    assert child.returncode == 0, child.stdout + child.stderr
    assert not (tmp_path / "run").exists()
    assert b"Traceback" not in child.stderr and b"Starting trainer" not in child.stdout + child.stderr
