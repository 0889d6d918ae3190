"""`mode: runs` and `mode: events` through the production worker and a loopback RunPod,
and through the client CLI (`finetune-worker runs`, `events`, `submit --webhook`).
The runs are made by hand: no training is needed to read one back."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import TRAINING_PROGRAMS, live_processes
from fake_runpod import FakeRunPod
from finetune_worker.contract.settings import REPO_ROOT
from finetune_worker.entry import client as worker_client
from loopback_sites import make_cert
from test_history import RESULT, make_run, progress
from test_runpod_loop import start_worker, stop_worker

USER = "hist-ep"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """A loopback RunPod and one production worker, over a volume of hand-made runs."""
    tmp = tmp_path_factory.mktemp("history-endpoint")
    volume = tmp / "volume"
    now = time.time()
    make_run(volume / "runs", USER, "first", created=now - 100, result=RESULT,
             events=[{"type": "status", "stage": "validating", "message": "v"}, progress(10, 0.5), RESULT])
    make_run(volume / "runs", USER, "second", created=now - 50, events=[progress(3, 1.0)])
    fake = FakeRunPod().start()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "WANDB_API_KEY")}
    env.update(BASE_VOLUME=str(volume), HF_HUB_OFFLINE="1")
    worker = start_worker(fake, env, tmp, "worker-history")
    yield fake, worker_client.connect(fake.endpoint_id, fake.client_env()), env, volume, worker
    stop_worker(worker)
    fake.close()


def ask(fake: FakeRunPod, job_input: dict):
    job_id = fake.submit(job_input)
    return fake.wait_for(job_id, lambda j: j.status in ("COMPLETED", "FAILED"), timeout=240)


def training_children(worker) -> list[int]:
    return live_processes("", TRAINING_PROGRAMS, parent=worker.pid)


def test_runs_and_events_through_the_runpod_loop(endpoint):
    fake, _, _, volume, worker = endpoint
    job = ask(fake, {"user_id": USER, "mode": "runs"})
    assert job.status == "COMPLETED", job.error
    answer = job.output[-1]
    assert answer["type"] == "result" and answer["mode"] == "runs"
    assert [(r["run_id"], r["state"]) for r in answer["runs"]] == [("second", "interrupted"), ("first", "completed")]
    started = time.monotonic()
    job = ask(fake, {"user_id": USER, "mode": "events", "run_id": "first", "offset": 1})
    assert time.monotonic() - started < 5, "a warm worker answers in about a second"
    assert job.output[-1]["events"] == [progress(10, 0.5), RESULT] and job.output[-1]["next_offset"] == 3
    assert training_children(worker) == []
    assert not (volume / "runs" / USER / "first.lock").exists()


def test_another_users_run_gets_exactly_the_answer_of_a_missing_one(endpoint):
    fake, _, _, volume, _ = endpoint
    make_run(volume / "runs", "someone-else", "theirs", created=time.time(), events=[progress(1, 2.0)])
    request = {"user_id": USER, "mode": "events", "run_id": "theirs"}
    exists_elsewhere = ask(fake, request)
    shutil.rmtree(volume / "runs" / "someone-else")
    missing = ask(fake, request)
    assert exists_elsewhere.status == missing.status == "FAILED"
    assert exists_elsewhere.error == missing.error and json.loads(missing.error)["code"] == "run_not_found"
    assert exists_elsewhere.stream == missing.stream


def cli(fake: FakeRunPod, env: dict, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cli_env = {**env, **fake.client_env(), "PYTHONPATH": str(REPO_ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "finetune_worker.entry.cli", *argv, "--endpoint", fake.endpoint_id],
                          env=cli_env, capture_output=True, text=True, timeout=timeout)


def test_the_cli_lists_runs_and_reads_a_runs_events(endpoint):
    fake, _, env, _, _ = endpoint
    listed = cli(fake, env, "runs", "--user-id", USER, "--json", "--poll", "0.2")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert [r["run_id"] for r in json.loads(listed.stdout)["runs"]] == ["second", "first"]
    table = cli(fake, env, "runs", "--user-id", USER, "--limit", "1", "--poll", "0.2")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:2] == ["run_id", "state"]
    assert table.stdout.splitlines()[1].split()[:2] == ["second", "interrupted"]
    assert "runs 1-1 of 2" in table.stderr and "--offset 1" in table.stderr
    read = cli(fake, env, "events", "first", "--user-id", USER, "--offset", "1", "--json", "--poll", "0.2")
    assert read.returncode == 0, read.stderr[-2000:]
    assert [json.loads(line) for line in read.stdout.splitlines()] == [progress(10, 0.5), RESULT]
    assert "is completed; 3 events read" in read.stderr
    missing = cli(fake, env, "events", "nothing", "--user-id", USER, "--poll", "0.2")
    assert missing.returncode == 1 and "run_not_found" in missing.stderr


class Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        Hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_submit_sends_the_webhook_and_runpod_calls_it_at_the_end(endpoint, tmp_path):
    fake, _, env, _, _ = endpoint
    cert, key = make_cert(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    fake.webhook_tls = ssl.create_default_context(cafile=str(cert))  # RunPod trusts the hook's certificate
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://localhost:{server.server_address[1]}/done"
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"base_model": "org/m", "lerning_rate": 1e-3}))  # refused at validation
    try:
        done = cli(fake, env, "submit", str(config), "--user-id", USER, "--run-id", "hooked", "--webhook", url, "--json", "--poll", "0.2")
        job_id = done.stderr.split("submitted job ")[1].split()[0]
        assert fake.jobs[job_id].webhook == url
        fake.wait_for(job_id, lambda j: any(call[0] == job_id for call in fake.webhook_calls), timeout=30)
        assert Hook.received[-1]["id"] == job_id and Hook.received[-1]["status"] == "FAILED"
    finally:
        server.shutdown()
    assert done.returncode == 1 and json.loads(done.stdout.splitlines()[-1])["code"] == "invalid_config"


def test_a_webhook_that_is_not_https_is_refused_before_anything_is_sent(endpoint, tmp_path):
    """RunPod POSTs the job's final status (its result and events) to the webhook: never in clear text."""
    fake, ep, env, _, _ = endpoint
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"base_model": "org/m"}))
    before = len(fake.jobs)
    for url in ("http://hooks.example.com/done", "ftp://hooks.example.com/x", "https:///no-host", "hooks.example.com/done"):
        done = cli(fake, env, "submit", str(config), "--user-id", USER, "--webhook", url, "--json", "--poll", "0.2", timeout=60)
        assert done.returncode == 2 and "must be an https:// URL" in done.stderr, done.stderr[-2000:]
        with pytest.raises(ValueError, match="must be an https:// URL"):
            worker_client.submit(ep, {"user_id": USER, "mode": "runs"}, webhook=url)
    assert len(fake.jobs) == before, "nothing reached RunPod"


def test_a_request_mixing_modes_is_refused_with_every_reason(endpoint):
    fake, _, _, _, _ = endpoint
    job = ask(fake, {"user_id": USER, "mode": "events", "model_id": "m", "limit": 5000})
    error = json.loads(job.error)
    assert job.status == "FAILED" and error["code"] == "invalid_input"
    assert sorted(error["details"]) == [
        "limit: at most 1000 for mode 'events'",
        "model_id: not used by mode 'events' (it only reads this user's runs)",
        "run_id: required field is missing (the run whose events to read)",
    ]


def test_webhook_field_goes_beside_input_as_the_sdk_sends_a_whole_request(endpoint):
    fake, ep, _, _, _ = endpoint
    job_id = worker_client.submit(ep, {"user_id": USER, "mode": "runs"}, webhook="https://127.0.0.1:9/none")
    assert fake.jobs[job_id].webhook == "https://127.0.0.1:9/none" and fake.jobs[job_id].input == {"user_id": USER, "mode": "runs"}
    # runpod.Endpoint.run sends a request that has an "input" key as it is: the same body
    sdk_job = ep.run({"input": {"user_id": USER, "mode": "runs"}, "webhook": "http://127.0.0.1:9/sdk"})
    assert fake.jobs[sdk_job.job_id].webhook == "http://127.0.0.1:9/sdk"
    fake.wait_for(sdk_job.job_id, lambda j: j.status == "COMPLETED", timeout=60)


def test_reading_leaves_the_volume_as_it_was(endpoint):
    fake, _, _, volume, _ = endpoint
    before = sorted((str(p), p.stat().st_mtime) for p in Path(volume / "runs" / USER).rglob("*"))
    ask(fake, {"user_id": USER, "mode": "runs"})
    ask(fake, {"user_id": USER, "mode": "events", "run_id": "second"})
    assert sorted((str(p), p.stat().st_mtime) for p in Path(volume / "runs" / USER).rglob("*")) == before
