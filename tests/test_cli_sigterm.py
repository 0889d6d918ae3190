"""SIGTERM to `finetune-worker run`: the job stops and its final `cancelled` event reaches stdout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

from finetune_worker.contract import errors
from finetune_worker.contract.settings import REPO_ROOT


def test_sigterm_prints_the_final_cancelled_event(tmp_path):
    job = json.loads((REPO_ROOT / "test_input.json").read_text())
    job["input"]["run_id"] = f"sigterm-{uuid.uuid4().hex[:8]}"
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "BASE_VOLUME": str(tmp_path / "volume"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    child = subprocess.Popen(
        [sys.executable, "-m", "finetune_worker.entry.cli", "run", str(job_file), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT,
    )
    try:
        first = json.loads(child.stdout.readline())  # the job has started: validating
        assert first["type"] == "status"
        child.send_signal(signal.SIGTERM)
        rest, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    lines = [json.loads(line) for line in rest.splitlines() if line.strip()]
    assert child.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert lines and lines[-1]["type"] == "error" and lines[-1]["code"] == errors.CANCELLED, (lines[-3:], stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
