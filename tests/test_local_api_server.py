"""RunPod's local API server (`--rp_serve_api`) and what the README says of it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from finetune_worker.contract import errors
from finetune_worker.contract.settings import REPO_ROOT
from finetune_worker.entry.worker import make_handler


def _local_server(monkeypatch, tmp_path):
    from runpod.serverless.modules import rp_fastapi

    monkeypatch.setenv("BASE_VOLUME", str(tmp_path))
    # The SDK keeps its job list in .runpod_jobs.pkl in the working directory: not in the repo.
    monkeypatch.setattr(type(rp_fastapi.job_list), "_STATE_FILE", str(tmp_path / ".runpod_jobs.pkl"))
    # The SDK's simulation endpoints, called without starting its web server or heartbeat.
    return rp_fastapi, SimpleNamespace(config={"handler": make_handler(chain_sigterm=False)})


FAILING_JOB = {"user_id": "u", "model_id": "m", "run_id": "../bad", "args": {"base_model": "a/b"}}


def test_the_local_runsync_reports_a_failed_job_as_completed(monkeypatch, tmp_path):
    rp_fastapi, server = _local_server(monkeypatch, tmp_path)
    answer = asyncio.run(rp_fastapi.WorkerAPI._sim_runsync(server, rp_fastapi.DefaultRequest(input=FAILING_JOB)))
    assert answer["status"] == "COMPLETED"  # the SDK's behaviour, not a deployed endpoint's
    assert answer["output"][-1]["type"] == "error" and answer["output"][-1]["code"] == errors.INVALID_INPUT


def test_the_local_status_runs_the_stored_job_once(monkeypatch, tmp_path):
    rp_fastapi, server = _local_server(monkeypatch, tmp_path)
    queued = asyncio.run(rp_fastapi.WorkerAPI._sim_run(server, rp_fastapi.DefaultRequest(input=FAILING_JOB)))
    assert queued["status"] == "IN_PROGRESS"
    answer = asyncio.run(rp_fastapi.WorkerAPI._sim_status(server, queued["id"]))
    assert answer["status"] == "COMPLETED" and answer["output"][-1]["type"] == "error"
    again = asyncio.run(rp_fastapi.WorkerAPI._sim_status(server, queued["id"]))
    assert again == {"id": queued["id"], "status": "FAILED", "error": "Job ID not found"}


def test_the_readme_documents_the_local_server():
    readme = (REPO_ROOT / "docs" / "operating.md").read_text(encoding="utf-8")
    assert "local `--rp_serve_api`" in readme
    assert "**also when the job failed**" in readme and "Job ID not found" in readme


def test_a_cold_worker_takes_jobs_before_axolotls_schema_is_loaded_and_loads_it_beside_them(tmp_path):
    """`python -u src/handler.py` (here serving the SDK's local API): the job loop starts at
    once and Axolotl's schema is imported beside it, so a question that needs no Axolotl
    (mode runs) is answered before that import ends; the import still ends, for later jobs."""
    import json
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from finetune_worker.host.tools import free_port

    port, out = free_port(), tmp_path / "worker.out"
    env = {**os.environ, "BASE_VOLUME": str(tmp_path / "volume"), "HF_HUB_OFFLINE": "1"}
    with open(out, "wb") as sink:
        worker = subprocess.Popen([sys.executable, "-u", str(REPO_ROOT / "src" / "handler.py"), "--rp_serve_api", "--rp_api_port", str(port)],
                                  env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    loaded = "finetune-worker: Axolotl schema loaded"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/runsync", headers={"Content-Type": "application/json"},
                                                 data=json.dumps({"input": {"user_id": "cold", "mode": "runs"}}).encode())
                with urllib.request.urlopen(request, timeout=60) as answer:
                    output = json.load(answer)["output"]
                break
            except OSError:
                assert time.monotonic() < deadline and worker.poll() is None, out.read_text(errors="replace")[-2000:]
                time.sleep(0.1)
        assert output[-1]["type"] == "result" and output[-1]["mode"] == "runs", output
        assert loaded not in out.read_text(errors="replace"), "the schema was imported before the first job was answered"
        while loaded not in out.read_text(errors="replace"):
            assert time.monotonic() < deadline and worker.poll() is None, out.read_text(errors="replace")[-2000:]
            time.sleep(0.2)
    finally:
        os.killpg(worker.pid, 9)
        worker.wait()
