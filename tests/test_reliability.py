"""Crashes with names, preemption and resume, concurrency, disk full: real processes, real signals."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import collect, make_job, tiny_args, training_pids
from finetune_worker.contract.settings import REPO_ROOT

pytestmark = pytest.mark.training


def types(evs):
    return [e["type"] for e in evs]


def messages(evs, kind):
    return [e["message"] for e in evs if e["type"] == kind]


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def start_cli_job(job: dict, env: dict, tmp: Path) -> subprocess.Popen:
    job_file = tmp / f"{job['run_id']}.json"
    job_file.write_text(json.dumps({"input": job}))
    return subprocess.Popen(
        [sys.executable, "-m", "finetune_worker.entry.cli", "run", str(job_file), "--json"],
        env={**env, "PYTHONPATH": str(REPO_ROOT / "src")},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def read_until(process: subprocess.Popen, predicate, timeout: float = 240) -> list[dict]:
    """Events from a `finetune-worker run --json` process until one satisfies `predicate`."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(json.loads(line))
        if predicate(seen[-1]):
            return seen
    raise AssertionError(f"no matching event; saw {[e['type'] for e in seen]}")


def wait_gone(marker: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while training_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not training_pids(marker)


# ------------------------------------------------------------------ crash classes
def test_nan_loss_is_caught_and_its_checkpoints_are_set_aside(tiny, env, volume):
    job = make_job(tiny_args(tiny, learning_rate=1e12, max_grad_norm=0, num_epochs=2))
    evs = collect(job, env)
    assert evs[-1]["type"] == "error" and evs[-1]["code"] == "nan_loss", evs[-1]
    assert "learning_rate" in evs[-1]["message"]
    output = volume / "runs" / "tester" / job["run_id"] / "output"
    assert not list(output.glob("checkpoint-*[0-9]")), "a NaN checkpoint must never be resumed"


def test_malformed_dataset_is_a_dataset_error(tiny, env, volume):
    data = volume / "bad-data.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(8)))
    evs = collect(make_job(tiny_args(tiny, datasets=[{"path": str(data), "type": "alpaca", "ds_type": "json"}])), env)
    assert evs[-1]["code"] == "dataset_error", evs[-1]
    # found by the worker's own row check, before any training process started
    assert "line 1: missing field 'instruction'" in evs[-1]["message"] and evs[-1]["log_tail"] == []


def test_training_process_killed_by_a_signal_is_named(tiny, env, volume, tmp_path):
    job = make_job(tiny_args(tiny, num_epochs=300))
    marker = str(volume / "runs" / "tester" / job["run_id"])
    process = start_cli_job(job, env, tmp_path)
    read_until(process, lambda e: e["type"] == "progress")
    for pid in training_pids(marker):
        os.kill(pid, signal.SIGKILL)
    final = read_until(process, lambda e: e["type"] in ("result", "error"))[-1]
    process.wait(30)
    # SIGKILL is what the kernel's OOM killer sends: named as host memory (issue 19)
    assert final["code"] == "out_of_memory" and "SIGKILL" in final["message"] and "RAM" in final["message"]
    assert process.returncode == 1


# --------------------------------------------------------------- preemption/resume
def test_a_killed_worker_resumes_from_its_last_complete_checkpoint(tiny, env, volume, tmp_path):
    job = make_job(tiny_args(tiny, num_epochs=20, save_steps=20, save_total_limit=5))
    run_dir = volume / "runs" / "tester" / job["run_id"]
    process = start_cli_job(job, env, tmp_path)
    read_until(process, lambda e: e["type"] == "checkpoint" and e["step"] >= 40)
    os.killpg(process.pid, signal.SIGKILL)  # the worker dies; its training child dies with it
    process.wait(30)
    wait_gone(str(run_dir))
    complete = max(int(p.name.split("-")[1]) for p in (run_dir / "output").glob("checkpoint-*"))
    # the worker died while writing a newer checkpoint: copy without trainer_state.json
    torn = run_dir / "output" / f"checkpoint-{complete + 7}"
    shutil.copytree(run_dir / "output" / f"checkpoint-{complete}", torn)
    (torn / "trainer_state.json").unlink()

    evs = collect(job, env)
    assert evs[-1]["type"] == "result", evs[-1]
    warnings = messages(evs, "warning")
    assert any("took over the lock" in w for w in warnings), warnings
    assert any(f"checkpoint-{complete + 7} is incomplete" in w for w in warnings), warnings
    resumed = [e for e in evs if e["type"] == "status" and e.get("resumed_from_step")]
    assert resumed and resumed[0]["resumed_from_step"] == complete
    assert any(e["type"] == "status" and e["message"] == f"training 180 steps from step {complete}" for e in evs)
    progress = [e for e in evs if e["type"] == "progress"]
    assert progress[0]["step"] > complete and progress[-1]["step"] == 180
    assert evs[-1]["metrics"]["total_steps"] == 180
    assert "training process" in (run_dir / "train.log").read_text().split("=====")[-2]  # both attempts logged
    assert (run_dir / "train.log").read_text().count("===== training process") == 2


def test_a_completed_run_returns_its_stored_result_and_restart_trains_again(tiny, env, volume):
    job = make_job(tiny_args(tiny, max_steps=5))
    first = collect(job, env)
    assert first[-1]["type"] == "result"
    started = time.monotonic()
    again = collect(job, env)
    assert time.monotonic() - started < 20
    assert again[-1]["type"] == "result" and again[-1]["reused"] is True
    assert again[-1]["metrics"] == first[-1]["metrics"]
    assert "progress" not in types(again)
    run_dir = volume / "runs" / "tester" / job["run_id"]
    assert (run_dir / "train.log").read_text().count("===== training process") == 1

    fresh = collect({**job, "restart": True}, env)
    assert fresh[-1]["type"] == "result" and "reused" not in fresh[-1]
    assert any("earlier attempt was kept as" in e.get("message", "") for e in fresh)
    kept = list(run_dir.parent.glob(f"{job['run_id']}.previous-*"))
    assert len(kept) == 1 and (kept[0] / "result.json").is_file()


def test_a_different_config_under_the_same_run_id_is_refused(tiny, env):
    job = make_job(tiny_args(tiny, max_steps=5))
    assert collect(job, env)[-1]["type"] == "result"
    changed = {**job, "args": tiny_args(tiny, max_steps=6)}
    evs = collect(changed, env)
    assert evs[-1]["code"] == "invalid_input" and "restart: true" in evs[-1]["message"]


# -------------------------------------------------------------------- concurrency
def test_a_second_job_for_a_running_run_fails_at_once(tiny, env, volume, tmp_path):
    job = make_job(tiny_args(tiny, num_epochs=300))
    process = start_cli_job(job, env, tmp_path)
    try:
        read_until(process, lambda e: e["type"] == "progress")
        started = time.monotonic()
        evs = collect(job, env)
        assert time.monotonic() - started < 15
        assert types(evs) == ["status", "error"] and evs[-1]["code"] == "run_in_progress"
        assert str(process.pid) in evs[-1]["message"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


def test_two_runs_at_once_never_share_files(tiny, env, volume):
    jobs = [make_job(tiny_args(tiny, max_steps=10)) for _ in range(2)]
    results = {}

    def run(job):
        results[job["run_id"]] = collect(job, env)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for job in jobs:
        evs = results[job["run_id"]]
        assert evs[-1]["type"] == "result", evs[-1]
        assert evs[-1]["output_dir"] == str(volume / "runs" / "tester" / job["run_id"] / "output")
    a, b = (volume / "runs" / "tester" / j["run_id"] for j in jobs)
    assert a != b and (a / "output" / "adapter_model.safetensors").is_file() and (b / "output" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------- disk full
@pytest.fixture
def small_volume(tmp_path):
    """A real small filesystem (tmpfs) as BASE_VOLUME; needs root, skipped elsewhere."""
    mount = tmp_path / "small"
    mount.mkdir()

    def mount_it(megabytes: int) -> Path:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mount)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        return mount

    yield mount_it
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_run_that_cannot_fit_fails_before_training(small_volume, env):
    volume = small_volume(16)
    args = tiny_args(REPO_ROOT / "examples", save_total_limit=3, save_steps=5, max_steps=20)
    args.update(base_model="examples/tiny-llama", datasets=[{"path": "examples/tiny_alpaca.jsonl", "type": "alpaca", "ds_type": "json"}])
    del args["adapter"]  # a full fine-tune: weights plus Adam states per checkpoint
    started = time.monotonic()
    evs = collect(make_job(args), {**env, "BASE_VOLUME": str(volume)})
    assert evs[-1]["code"] == "disk_full", evs[-1]
    assert "free" in evs[-1]["message"] and "checkpoint" in evs[-1]["message"]
    assert time.monotonic() - started < 15
    assert not list(volume.glob("runs/*/*/train.log"))


def test_a_volume_that_fills_up_during_training_is_disk_full(small_volume, env):
    volume = small_volume(24)
    args = tiny_args(REPO_ROOT / "examples", num_epochs=300, save_steps=10, save_total_limit=2)
    args.update(base_model="examples/tiny-llama", datasets=[{"path": "examples/tiny_alpaca.jsonl", "type": "alpaca", "ds_type": "json"}])
    job = make_job(args)
    filler = volume / "filler"

    async def run():
        from finetune_worker.pipeline import run_job

        seen = []
        async for event in run_job(job, env={**env, "BASE_VOLUME": str(volume)}):
            seen.append(event)
            if event["type"] == "progress" and not filler.exists():
                free = shutil.disk_usage(volume).free
                try:
                    with open(filler, "wb") as handle:  # something else fills the volume
                        handle.write(b"\0" * max(0, free - 4096))
                except OSError as exc:  # the training took the last bytes first: the volume is full either way
                    if exc.errno != errno.ENOSPC:
                        raise
        return seen

    evs = asyncio.run(run())
    assert evs[-1]["type"] == "error" and evs[-1]["code"] == "disk_full", evs[-1]
    assert evs[-1]["log_tail"]
