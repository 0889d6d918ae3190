"""The worker in production mode (`python -u src/handler.py`) against a loopback RunPod.

The real runpod SDK runs on both sides: the worker's job loop takes jobs, streams,
posts progress and results, and long-polls the stop channel; the tests act as a
client through runpod.Endpoint's HTTP client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_job, tiny_args, training_pids
from fake_runpod import FakeRunPod
from finetune_worker.contract.settings import REPO_ROOT
from finetune_worker.entry import client as worker_client

pytestmark = pytest.mark.training
CANARY = "hf_CANARYrunpodLoop0123456789"


def wait_until(predicate, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def start_worker(fake: FakeRunPod, env: dict, tmp: Path, worker_id: str) -> subprocess.Popen:
    log = open(tmp / f"{worker_id}.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-u", str(REPO_ROOT / "src" / "handler.py")],
        cwd=tmp,
        env={**env, **fake.worker_env(worker_id), "PYTHONPATH": str(REPO_ROOT / "src")},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_worker(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def loop(tmp_path_factory, tiny, volume):
    """A fake RunPod, one production worker, and an SDK client pointed at both."""
    tmp = tmp_path_factory.mktemp("runpod")
    fake = FakeRunPod().start()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "WANDB_API_KEY")}
    env.update(BASE_VOLUME=str(volume), HF_HUB_OFFLINE="1")
    worker = start_worker(fake, env, tmp, "worker-1")
    endpoint = worker_client.connect(fake.endpoint_id, fake.client_env())
    yield fake, endpoint, env, tmp
    stop_worker(worker)
    fake.close()
    assert CANARY.encode() not in (tmp / "worker-1.log").read_bytes()
    assert not any(CANARY.encode() in body for body in fake.worker_posts + fake.client_replies)


def run_dir(volume: Path, job_input: dict) -> Path:
    return volume / "runs" / job_input["user_id"] / job_input["run_id"]


def test_status_and_stream_show_live_progress_and_end_completed(loop, tiny, volume):
    fake, endpoint, _, _ = loop
    job_input = make_job(tiny_args(tiny, num_epochs=20), credentials={"hf_token": CANARY})
    job_id = worker_client.submit(endpoint, job_input)
    marker = str(run_dir(volume, job_input))
    status_progress, streamed, alive_at_first_progress = [], [], None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = endpoint.rp_client.get(f"{fake.endpoint_id}/status/{job_id}")
        output = state.get("output")
        if state["status"] == "IN_PROGRESS" and isinstance(output, dict) and output.get("type") == "progress":
            status_progress.append(output["step"])
        for chunk in endpoint.rp_client.get(f"{fake.endpoint_id}/stream/{job_id}")["stream"]:
            streamed.append(chunk["output"])
            if chunk["output"]["type"] == "progress" and alive_at_first_progress is None:
                alive_at_first_progress = bool(training_pids(marker))
        if state["status"] in worker_client.TERMINAL:
            break
        time.sleep(0.2)

    # /status: IN_PROGRESS with the latest progress, advancing while training runs
    assert len(set(status_progress)) >= 2, status_progress
    assert status_progress == sorted(status_progress)
    # /stream: chunks arrive while the training process is still alive
    assert alive_at_first_progress is True
    final = endpoint.rp_client.get(f"{fake.endpoint_id}/status/{job_id}")
    assert final["status"] == "COMPLETED"
    assert final["output"][-1]["type"] == "result"
    assert final["output"][-1]["metrics"]["total_steps"] == 180
    assert [e["type"] for e in final["output"]] == [e["type"] for e in streamed]
    progress = [e for e in final["output"] if e["type"] == "progress"]
    assert {"step", "total_steps", "loss", "percent", "eta_seconds"} <= set(progress[0])
    assert fake.pings > 0


def test_cancel_stops_the_whole_training_tree_and_the_worker_takes_the_next_job(loop, tiny, volume):
    fake, endpoint, _, _ = loop
    job_input = make_job(tiny_args(tiny, num_epochs=500, save_steps=20, save_total_limit=3))
    job_id = worker_client.submit(endpoint, job_input)
    marker = str(run_dir(volume, job_input))
    job = fake.wait_for(job_id, lambda j: any(c["output"]["type"] == "checkpoint" for c in j.stream), timeout=180)
    assert job.status == "IN_PROGRESS" and training_pids(marker)

    cancelled_at = time.monotonic()
    assert worker_client.cancel(endpoint, job_id)["status"] == "CANCELLED"
    assert wait_until(lambda: not training_pids(marker), timeout=10), "training still running 10 s after /cancel"
    assert time.monotonic() - cancelled_at < 10
    assert endpoint.rp_client.get(f"{fake.endpoint_id}/status/{job_id}")["status"] == "CANCELLED"
    kept = run_dir(volume, job_input)
    assert (kept / "config.yaml").is_file() and (kept / "train.log").is_file()
    assert list((kept / "output").glob("checkpoint-*")), "checkpoints must survive a cancel"

    def last_recorded():
        return json.loads((kept / "events.jsonl").read_text().splitlines()[-1])

    assert wait_until(lambda: last_recorded()["type"] == "error", timeout=5)
    assert last_recorded()["code"] == "cancelled"

    follow_up = make_job(tiny_args(tiny, max_steps=5))
    next_id = worker_client.submit(endpoint, follow_up)
    done = fake.wait_for(next_id, lambda j: j.status in ("COMPLETED", "FAILED"), timeout=180)
    assert done.status == "COMPLETED", done.error


def test_execution_timeout_arrives_like_a_cancel(loop, tiny, volume):
    fake, endpoint, _, _ = loop
    job_input = make_job(tiny_args(tiny, num_epochs=500))
    job_id = worker_client.submit(endpoint, job_input, execution_timeout_s=25)
    marker = str(run_dir(volume, job_input))
    fake.wait_for(job_id, lambda j: any(c["output"]["type"] == "progress" for c in j.stream), timeout=120)
    fake.wait_for(job_id, lambda j: j.status == "TIMED_OUT", timeout=60)
    assert wait_until(lambda: not training_pids(marker), timeout=10)


def test_invalid_job_ends_failed_with_a_sanitised_error(loop, tiny):
    fake, endpoint, _, _ = loop
    args = tiny_args(tiny, datasets=[{"path": str(tiny / "tiny_alpaca.jsonl"), "type": "alpacca"}])
    job_id = worker_client.submit(endpoint, make_job(args, credentials={"hf_token": CANARY}))
    fake.wait_for(job_id, lambda j: j.status in worker_client.TERMINAL, timeout=60)
    state = endpoint.rp_client.get(f"{fake.endpoint_id}/status/{job_id}")
    assert state["status"] == "FAILED"
    error = json.loads(state["error"])
    assert error["code"] == "invalid_config"
    assert "args.datasets[0].type: unknown type 'alpacca'; did you mean 'alpaca'?" in error["details"]
    assert "Traceback" not in state["error"]
    assert not any(CANARY.encode() in body for body in fake.worker_posts + fake.client_replies)


def test_crashed_training_ends_failed_with_its_log_tail(loop, tiny, volume):
    fake, endpoint, _, _ = loop
    broken = volume / "broken-model-loop"
    if not broken.exists():
        import shutil

        shutil.copytree(tiny / "tiny-llama", broken)
        (broken / "model.safetensors").write_bytes(b"garbage")
    job_id = worker_client.submit(endpoint, make_job(tiny_args(tiny, base_model=str(broken)), credentials={"hf_token": CANARY}))
    fake.wait_for(job_id, lambda j: j.status in worker_client.TERMINAL, timeout=180)
    state = endpoint.rp_client.get(f"{fake.endpoint_id}/status/{job_id}")
    assert state["status"] == "FAILED"
    error = json.loads(state["error"])
    assert error["code"] == "model_load_error" and error["log_tail"]
    assert CANARY not in state["error"]


def test_client_submits_follows_and_reattaches(loop, tiny, tmp_path):
    fake, _, env, _ = loop
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_args(tiny, max_steps=8)))
    cli_env = {**env, **fake.client_env(), "PYTHONPATH": str(REPO_ROOT / "src")}
    submit = subprocess.run(
        [sys.executable, "-m", "finetune_worker.entry.cli", "submit", str(config), "--endpoint", fake.endpoint_id,
         "--user-id", "tester", "--run-id", f"cli-{int(time.time())}", "--json", "--poll", "0.3"],
        env=cli_env, capture_output=True, text=True, timeout=300,
    )
    assert submit.returncode == 0, submit.stderr[-3000:]
    events = [json.loads(line) for line in submit.stdout.splitlines()]
    assert events[-1]["type"] == "result" and events[-1]["metrics"]["total_steps"] == 8
    assert any(e["type"] == "progress" for e in events)
    job_id = submit.stderr.split("submitted job ")[1].split()[0]

    status = subprocess.run(
        [sys.executable, "-m", "finetune_worker.entry.cli", "status", job_id, "--endpoint", fake.endpoint_id, "--json"],
        env=cli_env, capture_output=True, text=True, timeout=60,
    )
    assert status.returncode == 0, status.stderr[-3000:]
    assert json.loads(status.stdout.splitlines()[-1])["type"] == "result"


def test_sigterm_to_the_worker_stops_the_training_tree(tmp_path, tiny, volume):
    fake = FakeRunPod().start()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "WANDB_API_KEY")}
    env.update(BASE_VOLUME=str(volume), HF_HUB_OFFLINE="1")
    worker = start_worker(fake, env, tmp_path, "worker-term")
    try:
        job_input = make_job(tiny_args(tiny, num_epochs=500))
        job_id = fake.submit(job_input)
        marker = str(run_dir(volume, job_input))
        fake.wait_for(job_id, lambda j: any(c["output"]["type"] == "progress" for c in j.stream), timeout=180)
        assert training_pids(marker)
        os.kill(worker.pid, signal.SIGTERM)
        assert wait_until(lambda: not training_pids(marker), timeout=10), "training survived SIGTERM"
        job = fake.wait_for(job_id, lambda j: j.status in worker_client.TERMINAL, timeout=30)
        assert job.status == "FAILED" and json.loads(job.error)["code"] == "cancelled"
        assert worker.wait(60) is not None
    finally:
        stop_worker(worker)
        fake.close()
