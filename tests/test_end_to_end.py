"""Real Axolotl trainings on CPU with the tiny model, through the whole pipeline."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import collect, make_job, tiny_args
from finetune_worker.contract.settings import REPO_ROOT

pytestmark = pytest.mark.training
CANARY_HF = "hf_CANARYe2eTokenDoNotLeak0001"
CANARY_WANDB = "wandb-canary-e2e-0123456789abcdef"


def types(evs):
    return [e["type"] for e in evs]


def stages(evs):
    """The stages in order, each run of one stage once."""
    seen = [e["stage"] for e in evs if e["type"] == "status"]
    return [stage for index, stage in enumerate(seen) if index == 0 or seen[index - 1] != stage]


@pytest.fixture(scope="module")
def successful_run(tiny, volume):
    """One real training shared by the assertions below (about 25 s)."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "WANDB_API_KEY")}
    env.update(BASE_VOLUME=str(volume), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    job = make_job(
        tiny_args(tiny, output_dir="./not-here", save_steps=40, save_total_limit=1),
        credentials={"hf_token": CANARY_HF, "wandb_api_key": CANARY_WANDB},
    )
    started = time.monotonic()
    evs = collect(job, env)
    return job, evs, time.monotonic() - started, volume / "runs" / "tester" / job["run_id"]


def test_events_come_in_contract_order(successful_run):
    _, evs, _, _ = successful_run
    assert types(evs)[-1] == "result", evs[-1]
    assert stages(evs)[:5] == ["validating", "preparing", "preprocessing", "downloading", "training"]
    first_progress = types(evs).index("progress")
    assert types(evs).index("status") < first_progress
    assert "checkpoint" in types(evs)
    warnings = [e["message"] for e in evs if e["type"] == "warning"]
    assert any(w.startswith("args.output_dir is set by the worker") for w in warnings)


def test_progress_events_are_complete_and_end_at_the_last_step(successful_run):
    _, evs, _, _ = successful_run
    progress = [e for e in evs if e["type"] == "progress"]
    assert len(progress) >= 2
    for event in progress:
        assert {"step", "total_steps", "epoch", "loss", "learning_rate", "percent", "eta_seconds"} <= set(event)
        assert event["loss"] is not None, event  # logging_steps: 1, so every step's event waits for its loss
    assert progress[-1]["step"] == progress[-1]["total_steps"] == 90
    assert progress[-1]["percent"] == 100.0
    steps = [p["step"] for p in progress]
    assert steps == sorted(steps)


def test_result_reports_a_falling_loss_and_the_adapter_is_on_disk(successful_run):
    job, evs, _, run_dir = successful_run
    result = evs[-1]
    assert result["status"] == "completed" and result["run_id"] == job["run_id"]
    metrics = result["metrics"]
    # first_loss and final_loss are one batch each (logging_steps: 1), and the tiny model is
    # pretrained: either can be an easy batch. The loss falls from the first epoch to the last.
    logged = [json.loads(line)["logs"] for line in (run_dir / "progress.jsonl").read_text().splitlines() if '"kind": "log"' in line]
    losses = [logs["loss"] for logs in logged if "loss" in logs]
    assert len(losses) == 90 and (metrics["first_loss"], metrics["final_loss"]) == (round(losses[0], 6), round(losses[-1], 6))
    assert sum(losses[-9:]) < 0.75 * sum(losses[:9]), losses  # 9 steps an epoch
    assert metrics["total_steps"] == 90
    assert "peak_memory_reserved" not in metrics  # a GPU-only figure (the GPU tests check it is there)
    measured = result["measured"]  # what the run measured: the GPU-only figures absent on a CPU, not 0
    assert measured["tokens"] > 0 and measured["tokens_per_second"] > 0 and measured["train_seconds"] > 0
    assert {"tokenize", "load", "train"} <= set(measured["phases_seconds"]) and measured["duration_seconds"] > measured["train_seconds"]
    assert not {"utilisation", "peak_memory_reserved", "peak_memory_allocated", "cost_usd"} & set(measured)  # no price for a CPU here
    output = Path(result["output_dir"])
    assert output == run_dir / "output"
    assert (output / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((output / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (output / "tokenizer.json").is_file()
    assert json.loads((run_dir / "result.json").read_text())["metrics"] == metrics


def test_the_time_and_cost_table_is_shown_as_training_begins(successful_run):
    """Every training shows the estimate's table from the train split it prepared (no tokenizing
    of its own), before its first step; its token count is the one the Trainer then counted."""
    _, evs, _, _ = successful_run
    shown = [e for e in evs if e["type"] == "status" and "estimate" in e]
    assert len(shown) == 1, shown
    begins = next(index for index, e in enumerate(evs) if e["type"] == "status" and e.get("total_steps"))
    assert evs.index(shown[0]) < begins
    table, result = shown[0]["estimate"], evs[-1]
    assert table["train_tokens"] == result["measured"]["tokens"] > 0  # 10 epochs of the 36 rows, no padding
    assert {("NVIDIA H100 80GB HBM3", 1), ("NVIDIA H100 80GB HBM3", 8)} <= {(row["gpu"], row["count"]) for row in table["rows"]}
    assert table["cheapest"]["fits"] and table["fastest"]["total_seconds"] > 0 and table["method"] == "lora"
    assert shown[0]["message"].startswith("estimate for") and shown[0]["message"].endswith("a CPU worker has no row")
    assert "estimate" not in result  # this worker's own row only on a GPU type the table knows


def test_run_directory_keeps_config_events_and_log_without_secrets(successful_run):
    job, evs, _, run_dir = successful_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["output_dir"] == str(run_dir / "output")
    assert config["plugins"][-1] == "finetune_worker.run.progress_plugin.ProgressPlugin"
    assert config["bf16"] is False and config["lora_mlp_kernel"] is False
    recorded = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert recorded == evs
    assert "loss" in (run_dir / "train.log").read_text()
    assert "started (on standby, importing Axolotl, since the job arrived)" in (run_dir / "train.log").read_text().splitlines()[0]
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert CANARY_HF.encode() not in data, path
            assert CANARY_WANDB.encode() not in data, path
    assert CANARY_HF not in json.dumps(evs) and CANARY_WANDB not in json.dumps(evs)


def test_invalid_job_fails_fast_with_every_problem_and_starts_nothing(tiny, env, volume):
    args = tiny_args(tiny, datasets=[{"path": str(tiny / "tiny_alpaca.jsonl"), "type": "alpacca"}])
    del args["base_model"]
    job = make_job(args, run_id="../x")
    started = time.monotonic()
    evs = collect(job, env)
    elapsed = time.monotonic() - started
    assert types(evs) == ["status", "error"]
    error = evs[-1]
    # the request's own problems first, all of them, before Axolotl's check (the misspelt type needs it)
    assert error["code"] == "invalid_input" and "before Axolotl's check of args" in error["message"]
    assert len(error["details"]) == 2
    assert any(d.startswith("run_id: invalid id") for d in error["details"])
    assert any(d.startswith("args.base_model: required field is missing") for d in error["details"])
    assert elapsed < 15
    assert not (volume / "runs" / "tester" / "x").exists()
    assert not (volume / "x").exists()
    # fixed: Axolotl's check reports the rest
    evs = collect({**job, "run_id": "fixed-x", "args": {**args, "base_model": str(tiny / "tiny-llama")}}, env)
    assert types(evs) == ["status", "error"] and evs[-1]["code"] == "invalid_config"
    assert evs[-1]["details"] == ["args.datasets[0].type: unknown type 'alpacca'; did you mean 'alpaca'?"]
    assert not (volume / "runs" / "tester" / "fixed-x").exists()


def test_config_only_problems_are_invalid_config(tiny, env):
    evs = collect(make_job(tiny_args(tiny, lerning_rate=1e-3)), env)
    assert evs[-1]["code"] == "invalid_config"
    assert evs[-1]["details"] == ["args.lerning_rate: unknown option; did you mean 'learning_rate'? (Axolotl would silently ignore it)"]


def test_crashing_training_ends_with_an_error_and_log_tail_not_a_result(tiny, env, volume):
    broken = volume / "broken-model"
    if not broken.exists():
        shutil.copytree(tiny / "tiny-llama", broken)
        (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    job = make_job(tiny_args(tiny, base_model=str(broken)), credentials={"hf_token": CANARY_HF})
    evs = collect(job, env)
    assert "result" not in types(evs)
    error = evs[-1]
    assert error["type"] == "error"
    assert error["code"] == "model_load_error", error
    assert error["log_tail"] and any("safetensors" in line.lower() or "error" in line.lower() for line in error["log_tail"])
    assert json.loads(error["error"])["code"] == "model_load_error"
    assert CANARY_HF not in json.dumps(evs)


def test_cli_json_mode_prints_only_events_and_exits_by_outcome(tiny, env, tmp_path):
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"input": make_job(tiny_args(tiny, max_steps=6))}))
    done = subprocess.run(
        [sys.executable, "-m", "finetune_worker.entry.cli", "run", str(job_file), "--json"],
        env={**env, "PYTHONPATH": str(REPO_ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stdout.splitlines()
    evs = [json.loads(line) for line in lines]
    assert done.returncode == 0, done.stderr[-2000:]
    assert evs[-1]["type"] == "result" and evs[-1]["status"] == "completed"
    assert evs[-1]["metrics"]["total_steps"] == 6

    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps({"input": make_job(tiny_args(tiny), run_id="../x")}))
    bad = subprocess.run(
        [sys.executable, "-m", "finetune_worker.entry.cli", "run", str(bad_file), "--json"],
        env={**env, "PYTHONPATH": str(REPO_ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert json.loads(bad.stdout.splitlines()[-1])["code"] == "invalid_input"


def test_a_log_every_step_does_not_flood_the_stream(tiny, env, monkeypatch):
    """logging_steps: 1 over 600 steps: progress stays about one a second."""
    import asyncio

    from finetune_worker.entry import worker

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    job = make_job(tiny_args(tiny, max_steps=600, micro_batch_size=1, sequence_len=64, logging_steps=1))
    started = time.monotonic()

    async def run():
        return [event async for event in worker.make_handler()({"id": "flood", "input": job})]

    evs = asyncio.run(run())
    elapsed = time.monotonic() - started
    assert evs[-1]["type"] == "result" and evs[-1]["metrics"]["total_steps"] == 600
    progress = [e for e in evs if e["type"] == "progress"]
    assert progress[-1]["step"] == 600
    assert len(progress) <= elapsed + 2
    assert len(json.dumps(evs)) < 200_000
