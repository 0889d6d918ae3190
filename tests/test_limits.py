"""Operator limits (FINETUNE_MAX_*): read from the environment, checked at validation and during training."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from conftest import collect, make_job
from finetune_worker.checks.validation import local_dataset_bytes, validate_job
from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import REPO_ROOT, SettingsInvalid, WorkerSettings
from finetune_worker.host.children import ChildProcess, Deadline, group_members
from finetune_worker.host.hardware import CPU_ONLY
from finetune_worker.host.redact import Redactor
from finetune_worker.host.resources import JobResources
from finetune_worker.host.tools import run_child
from finetune_worker.run.progress import ProgressTracker


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


@pytest.mark.parametrize("kept", [-1, 0, "-1"])
def test_a_save_total_limit_at_or_below_zero_is_refused(limited_volume, kept):
    """-1 makes the Trainer keep every checkpoint: with save_steps: 1, one per step until the volume is full."""
    settings = WorkerSettings(base_volume=limited_volume, examples_dir=REPO_ROOT / "examples")
    with pytest.raises(JobError) as caught:
        validate_job(job(save_total_limit=kept, save_steps=1), settings, CPU_ONLY)
    assert caught.value.code == errors.INVALID_CONFIG
    assert any(d.startswith("args.save_total_limit: ") and "would keep every checkpoint" in d for d in caught.value.details), caught.value.details


def test_the_operator_caps_the_checkpoints_a_run_keeps(limited_volume):
    from finetune_worker.plan.config import AxolotlPlan, with_checkpoint_cap

    settings = WorkerSettings(base_volume=limited_volume, examples_dir=REPO_ROOT / "examples", max_checkpoints=2)
    with pytest.raises(JobError) as caught:
        validate_job(job(save_total_limit=5, save_steps=10), settings, CPU_ONLY)
    assert any(d.startswith("args.save_total_limit: 5 is over") and "FINETUNE_MAX_CHECKPOINTS" in d for d in caught.value.details)
    unset = AxolotlPlan(config={"save_steps": 10}, warnings=[], publish={}, adapted_for_cpu=[])  # Axolotl would keep 4
    capped = with_checkpoint_cap(unset, 2)
    assert capped.config["save_total_limit"] == 2 and "FINETUNE_MAX_CHECKPOINTS" in capped.warnings[-1] and "save_total_limit" not in unset.config
    assert with_checkpoint_cap(with_checkpoint_cap(unset, 2), 2).config == capped.config
    assert with_checkpoint_cap(unset, None) is unset


def test_a_run_estimated_over_the_size_cap_is_refused_before_it_starts(limited_volume):
    from finetune_worker.sizing.capacity import check_disk
    from finetune_worker.sizing.resources import ModelFacts

    model = ModelFacts(weight_bytes=4_000_000, needs_download=True, config={"torch_dtype": "float32"})  # a full fine-tune: 12 MB a checkpoint
    config = {"save_total_limit": 3, "num_epochs": 3}
    check_disk(config, model, WorkerSettings(base_volume=limited_volume, max_run_bytes=100_000_000))
    with pytest.raises(JobError) as caught:
        check_disk(config, model, WorkerSettings(base_volume=limited_volume, max_run_bytes=30_000_000))
    assert caught.value.code == errors.DISK_QUOTA and "FINETUNE_MAX_RUN_BYTES" in caught.value.message
    assert "3 checkpoint(s)" in caught.value.message  # the download goes to the shared cache, not the run


def test_a_job_within_the_limits_passes(limited_volume):
    settings = WorkerSettings(base_volume=limited_volume, examples_dir=REPO_ROOT / "examples", max_steps=50, max_sequence_len=256,
                              max_lora_r=16, max_dataset_bytes=10_000, max_hours=1)
    validate_job(job(), settings, CPU_ONLY)


def test_numbers_sent_as_strings_reach_the_plan_as_numbers(limited_volume):
    # Axolotl's schema reads "10" as 10; the worker's own estimates (disk, memory) do the arithmetic on the same values
    from finetune_worker.sizing.memory import estimate_gpu_memory
    from finetune_worker.sizing.resources import kept_checkpoints, lora_params

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


def _job_state(env: dict[str, str], max_hours: float | None = None) -> JobResources:
    state = JobResources()
    state.start_clock(WorkerSettings.from_env(env), time.monotonic())
    if max_hours is not None:  # the job started long enough ago that this much of FINETUNE_MAX_HOURS is left
        state.job_deadline = Deadline.after(max_hours * 3600, f"FINETUNE_MAX_HOURS={max_hours:g} h for the whole job, counted from its start")
    return state


def _sleep_as(name: str, state: JobResources, tmp_path) -> tuple[JobError, float]:
    async def run() -> tuple[JobError, float]:
        started = time.monotonic()
        with pytest.raises(JobError) as caught:
            await run_child(["sleep", "60"], {}, tmp_path, name, state)
        return caught.value, time.monotonic() - started

    return asyncio.run(run())


def test_a_helper_child_ends_at_its_own_deadline_naming_the_setting(tmp_path):
    state = _job_state({"FINETUNE_PREFLIGHT_DEADLINE_S": "1"})
    error, took = _sleep_as("preflight", state, tmp_path)
    assert error.code == errors.DEADLINE_EXCEEDED and took < 20
    assert "the preflight was stopped" in error.message and "FINETUNE_PREFLIGHT_DEADLINE_S=1 s" in error.message
    assert state.child.timed_out and state.child.returncode is not None and not group_members(state.child.pid)


def test_the_hours_cap_bounds_a_child_that_is_not_a_training(tmp_path):
    # its own limit is 30 minutes (the default); what is left of the job's FINETUNE_MAX_HOURS comes first
    state = _job_state({"FINETUNE_MAX_HOURS": "2"}, max_hours=1 / 3600)
    error, took = _sleep_as("evaluation", state, tmp_path)
    assert error.code == errors.DEADLINE_EXCEEDED and took < 20
    assert "the evaluation was stopped" in error.message and "FINETUNE_MAX_HOURS" in error.message, error.message


def test_a_job_past_its_deadline_starts_no_child_and_a_standby_never_told_to_go_is_killed(tmp_path):
    state = _job_state({}, max_hours=-1.0)
    error, took = _sleep_as("merge", state, tmp_path)
    assert error.code == errors.DEADLINE_EXCEEDED and took < 1 and state.child.process is None

    async def standby() -> ChildProcess:
        child = ChildProcess(["sleep", "60"], {}, tmp_path / "log.txt", tmp_path / "progress.jsonl", Redactor(),
                             deadline=Deadline.after(1.0, "FINETUNE_MAX_HOURS=1 h"), what="the training")
        await child.start(standby=True)
        await asyncio.wait_for(child.process.wait(), 20)
        return child

    child = asyncio.run(standby())
    assert child.timed_out and child.returncode == -9


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
    # about 1 s from the job's start: whichever stage or child it falls in, the job ends there, naming it
    final = collect(make_job(_quickstart_args()), {**env, "FINETUNE_MAX_HOURS": "0.0003"})[-1]
    assert final["code"] == errors.DEADLINE_EXCEEDED and "FINETUNE_MAX_HOURS" in final["message"], final


@pytest.mark.training
def test_the_run_size_cap_stops_the_training_at_a_checkpoint_that_is_kept(env):
    """The run directory already holds 8 MiB (an earlier attempt's files, say); the cap leaves
    room for less than one checkpoint more, so the training stops right after its first one."""
    from finetune_worker.host.rundir import is_complete_checkpoint

    job = make_job({**_quickstart_args(), "max_steps": 6, "save_steps": 2, "save_total_limit": 1})
    run_dir = Path(env["BASE_VOLUME"]) / "runs" / job["user_id"] / job["run_id"]
    run_dir.mkdir(parents=True)
    (run_dir / "earlier.bin").write_bytes(b"\0" * (8 << 20))
    out = collect(job, {**env, "FINETUNE_MAX_RUN_BYTES": str((8 << 20) + 100_000)})
    final = out[-1]
    assert final["code"] == errors.DISK_QUOTA and "FINETUNE_MAX_RUN_BYTES" in final["message"], final
    assert "checkpoint of step 2" in final["message"] and "resubmit the same run_id" in final["message"]
    assert is_complete_checkpoint(run_dir / "output" / "checkpoint-2")
    assert not (run_dir / "output" / "checkpoint-4").exists() and not (run_dir / "trained.json").exists()
    assert max(e["step"] for e in out if e["type"] == "progress") == 2


def test_a_preflight_ends_at_its_deadline_with_the_named_code(env):
    """The preflight child imports Axolotl for longer than a second: its 1-s limit stops it.
    The job sent its rows inline: job.json keeps their count and digest, not the rows."""
    import json

    rows = [json.loads(line) for line in (REPO_ROOT / "examples" / "tiny_alpaca.jsonl").read_text().splitlines()[:20]]
    args = {**_quickstart_args(), "datasets": [{"type": "alpaca", "rows": rows}]}
    job = make_job(args, mode="preflight", evaluation={"dataset": {"rows": rows[:3], "format": "alpaca"}})
    out = collect(job, {**env, "FINETUNE_PREFLIGHT_DEADLINE_S": "1"})
    final = out[-1]
    assert final["code"] == errors.DEADLINE_EXCEEDED, final
    assert "the preflight was stopped at its deadline (FINETUNE_PREFLIGHT_DEADLINE_S=1 s" in final["message"]
    run_dir = Path(env["BASE_VOLUME"]) / "runs" / job["user_id"] / job["run_id"]
    assert (run_dir / "preflight.log").is_file() and not (run_dir / "preflight.json").exists()
    record = json.loads((run_dir / "job.json").read_text())
    assert record["args"]["datasets"][0]["rows"]["count"] == 20 and len(record["args"]["datasets"][0]["rows"]["sha256"]) == 64
    assert record["evaluation"]["dataset"]["rows"]["count"] == 3
    assert rows[0]["instruction"] not in (run_dir / "job.json").read_text()
