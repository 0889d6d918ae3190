"""Operator limits (FINETUNE_MAX_*): read from the environment, checked at validation and during training."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import collect, make_job
from finetune_worker.checks.validation import local_dataset_bytes, validate_job
from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import REPO_ROOT, SettingsInvalid, WorkerSettings
from finetune_worker.run.children import ChildProcess
from finetune_worker.run.hardware import CPU_ONLY
from finetune_worker.run.progress import ProgressTracker
from finetune_worker.run.redact import Redactor


@pytest.fixture
def limited_volume(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 100)  # 3,600 bytes
    return tmp_path


def job(**args):
    base = {"base_model": "examples/tiny-llama", "datasets": [{"path": "data/train.jsonl", "type": "alpaca"}],
            "adapter": "lora", "lora_r": 16, "sequence_len": 256, "max_steps": 50, "learning_rate": 1e-4}
    return {"user_id": "u", "model_id": "m", "run_id": "r", "args": {**base, **args}}


def test_limits_are_read_from_the_environment():
    settings = WorkerSettings.from_env({"FINETUNE_MAX_STEPS": "100", "FINETUNE_MAX_HOURS": "1.5", "FINETUNE_MAX_SEQUENCE_LEN": "1024",
                                        "FINETUNE_MAX_LORA_R": "64", "FINETUNE_MAX_DATASET_BYTES": "1000000"})
    assert settings.limits() == {"FINETUNE_MAX_STEPS": 100, "FINETUNE_MAX_HOURS": 1.5, "FINETUNE_MAX_SEQUENCE_LEN": 1024,
                                 "FINETUNE_MAX_LORA_R": 64, "FINETUNE_MAX_DATASET_BYTES": 1000000}
    assert WorkerSettings.from_env({}).limits() == {}


@pytest.mark.parametrize("name,value", [("FINETUNE_MAX_STEPS", "many"), ("FINETUNE_MAX_HOURS", "nan"), ("FINETUNE_MAX_HOURS", "0"),
                                        ("FINETUNE_MAX_LORA_R", "-8"), ("FINETUNE_MAX_DATASET_BYTES", "1.5GB")])
def test_a_bad_limit_fails_clearly(name, value, volume, env):
    with pytest.raises(SettingsInvalid, match=name):
        WorkerSettings.from_env({name: value})
    final = collect(make_job({"base_model": "a/b"}, mode="preflight"), {**env, name: value})[-1]
    assert final["code"] == errors.INVALID_CONFIG and name in final["message"] and "operator" in final["message"]


@pytest.mark.parametrize(
    ("limit", "value", "args", "where"),
    [
        ("max_steps", 10, {"max_steps": 50}, "args.max_steps"),
        ("max_sequence_len", 128, {"sequence_len": 256}, "args.sequence_len"),
        ("max_sequence_len", 128, {"sequence_len": None}, "args.sequence_len"),  # Axolotl's default, 512
        ("max_lora_r", 8, {"lora_r": 16}, "args.lora_r"),
        # numbers sent as strings: Axolotl's schema reads them as numbers, so the limits do too
        ("max_steps", 10, {"max_steps": "50"}, "args.max_steps"),
        ("max_steps", 10, {"max_steps": " 1_000 "}, "args.max_steps"),
        ("max_sequence_len", 1024, {"sequence_len": "10000000"}, "args.sequence_len"),
        ("max_sequence_len", 1024, {"sequence_len": 1e7}, "args.sequence_len"),
        ("max_lora_r", 8, {"lora_r": "100000"}, "args.lora_r"),
        ("max_lora_r", 8, {"adapter": "qlora", "lora_r": "16.0"}, "args.lora_r"),
        ("max_dataset_bytes", 1000, {}, "args.datasets"),
        ("max_dataset_bytes", 1000, {"datasets": [{"type": "alpaca", "rows": [{"instruction": "x" * 2000, "output": "y"}]}]}, "args.datasets"),
    ],
)
def test_a_job_over_a_limit_fails_validation_naming_it(limited_volume, limit, value, args, where):
    settings = WorkerSettings(base_volume=limited_volume, examples_dir=REPO_ROOT / "examples", **{limit: value})
    raw = job(**args)
    raw["args"] = {k: v for k, v in raw["args"].items() if v is not None}
    with pytest.raises(JobError) as caught:
        validate_job(raw, settings, CPU_ONLY)
    assert caught.value.code == errors.INVALID_CONFIG
    name = "FINETUNE_" + limit.upper()
    assert any(d.startswith(where + ":") and name in d for d in caught.value.details), caught.value.details


def test_a_job_within_the_limits_passes(limited_volume):
    settings = WorkerSettings(base_volume=limited_volume, examples_dir=REPO_ROOT / "examples", max_steps=50, max_sequence_len=256,
                              max_lora_r=16, max_dataset_bytes=10_000, max_hours=1)
    validate_job(job(), settings, CPU_ONLY)


def test_numbers_sent_as_strings_reach_the_plan_as_numbers(limited_volume):
    # Axolotl's schema reads "10" as 10; the worker's own estimates (disk, memory) do the arithmetic on the same values
    from finetune_worker.checks.memory import estimate_gpu_memory
    from finetune_worker.checks.resources import kept_checkpoints, lora_params

    settings = WorkerSettings(base_volume=limited_volume, examples_dir=REPO_ROOT / "examples")
    raw = job(max_steps="10", save_steps="5", micro_batch_size=" 2 ", sequence_len="256", lora_r="16.0", weight_decay="0.01")
    args = validate_job(raw, settings, CPU_ONLY).args
    assert (args["max_steps"], args["save_steps"], args["micro_batch_size"], args["sequence_len"], args["lora_r"], args["weight_decay"]) \
        == (10, 5, 2, 256, 16, 0.01)
    assert kept_checkpoints(args) == 2 and lora_params(args, None, 16_000) == 160
    model_config = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 1000}
    assert estimate_gpu_memory(args, model_config).total > 0


def test_a_file_is_counted_once_towards_the_dataset_limit(limited_volume):
    # a directory and its own data_files, and the same file in two lists (via a link): 3,600 bytes, not 14,400
    (limited_volume / "data" / "link.jsonl").symlink_to(limited_volume / "data" / "train.jsonl")
    settings = WorkerSettings(base_volume=limited_volume, examples_dir=REPO_ROOT / "examples", max_dataset_bytes=5000)
    entry = {"path": "data", "data_files": ["data/train.jsonl"], "type": "alpaca", "ds_type": "json"}
    raw = job(datasets=[entry], test_datasets=[{"path": "data/link.jsonl", "type": "alpaca", "ds_type": "json", "split": "train"}])
    valid = validate_job(raw, settings, CPU_ONLY)
    assert local_dataset_bytes(valid.args) == 3600
    (limited_volume / "data" / "more.jsonl").write_text("x" * 2000)  # now the directory holds 5,600 bytes
    with pytest.raises(JobError) as caught:
        validate_job(raw, settings, CPU_ONLY)
    assert any("5600 bytes" in d and "FINETUNE_MAX_DATASET_BYTES" in d for d in caught.value.details), caught.value.details


def test_the_limits_are_reported_in_a_status_event(env):
    rows = [{"instruction": "a"}]  # no output: the data check fails the job right after validation, cheaply
    raw = make_job({"base_model": "examples/tiny-llama", "learning_rate": 1e-4, "datasets": [{"type": "alpaca", "rows": rows}]}, mode="preflight")
    out = collect(raw, {**env, "FINETUNE_MAX_LORA_R": "64", "FINETUNE_MAX_HOURS": "2"})
    limits = [e for e in out if e["type"] == "status" and "limits" in e]
    assert limits and limits[0]["limits"] == {"FINETUNE_MAX_HOURS": 2.0, "FINETUNE_MAX_LORA_R": 64}
    assert "FINETUNE_MAX_LORA_R=64" in limits[0]["message"]


def test_the_hours_cap_stops_the_training_process(tmp_path):
    async def run() -> tuple[ChildProcess, float]:
        child = ChildProcess(["sleep", "60"], {}, tmp_path / "log.txt", tmp_path / "progress.jsonl", Redactor())
        await child.start()
        started = time.monotonic()
        async for _ in child.records(deadline=started + 1.0):
            pass
        return child, time.monotonic() - started

    child, took = asyncio.run(run())
    assert child.timed_out and child.returncode is not None and took < 20


def test_a_far_eta_is_warned_about_once():
    tracker = ProgressTracker(eta_warning_seconds=24 * 3600)
    tracker.feed({"kind": "train_begin", "time": 0.0, "step": 0, "max_steps": 100_000})
    warnings = []
    for step in range(1, 10):
        tracker.feed({"kind": "step", "time": 10.0 * step, "step": step})
        warnings.append(tracker.eta_warning())
    found = [w for w in warnings if w]
    assert len(found) == 1 and found[0]["type"] == "warning" and "hours" in found[0]["message"]
    quick = ProgressTracker(eta_warning_seconds=24 * 3600)
    quick.feed({"kind": "train_begin", "time": 0.0, "step": 0, "max_steps": 100})
    for step in range(1, 10):
        quick.feed({"kind": "step", "time": 1.0 * step, "step": step})
        assert quick.eta_warning() is None


def _quickstart_args() -> dict:
    import json

    return json.loads((REPO_ROOT / "test_input.json").read_text())["input"]["args"]


@pytest.mark.training
def test_a_run_over_the_step_limit_is_stopped_before_its_first_step(env):
    out = collect(make_job(_quickstart_args()), {**env, "FINETUNE_MAX_STEPS": "5"})
    final = out[-1]
    assert final["code"] == errors.INVALID_CONFIG and "FINETUNE_MAX_STEPS" in final["message"], final
    assert not [e for e in out if e["type"] == "progress"]


@pytest.mark.training
def test_the_hours_cap_ends_the_job_naming_the_setting(env):
    final = collect(make_job(_quickstart_args()), {**env, "FINETUNE_MAX_HOURS": "0.0003"})[-1]  # about 1 s
    assert final["code"] == errors.TRAINING_FAILED and "FINETUNE_MAX_HOURS" in final["message"], final
