"""Canary tokens through succeeding and failing jobs: they must appear nowhere.

Surfaces searched here: every yielded event, the run directory (YAML, job record,
events, progress records, the training log, checkpoints, outputs), the worker's
log and tracebacks, and the command line of every process while training runs.
The endpoint checks user tokens here (FINETUNE_USER_TOKEN_SECRET is a canary too),
so every job carries a valid credentials.user_token, itself a canary.
The RunPod side (aggregated output, /status, /stream) is searched in
test_runpod_loop.py, and the Hub side (model card, pushed files) in test_publish.py, where
the GGUF export child's files (its log, spec and GGUF files) are searched too.
The child that fetches a Hub model's config.json on the first job is searched too: the
token reaches the Hub from it, never from the worker's process.
A cluster's surfaces (both nodes' run directories with the spec, status and nonce files,
each node's output, torchrun's and the rank children's command lines) are searched in
test_cluster.py.
A job's bucket keys (credentials.s3_*) are searched in test_storage.py: the events, the
run directory, the worker's log and every object the job put in the bucket.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import jwt
import pytest

from conftest import collect, make_job, tiny_args

pytestmark = pytest.mark.training

HF_CANARY = "hf_CANARYsecretToken0000000001"
WANDB_CANARY = "CANARYwandbKey00000000000000000000000001"
USER_TOKEN_SECRET_CANARY = "CANARYuserTokenSecret000000000000000000001"
# make_job's user_id; valid for a day, so the check lets every job through
USER_TOKEN_CANARY = jwt.encode({"sub": "tester", "exp": int(time.time()) + 86400, "jti": "CANARY"}, USER_TOKEN_SECRET_CANARY, "HS256")
COMET_CANARY = "CANARYcometKey0000000000000000001"
CANARIES = (HF_CANARY, WANDB_CANARY, USER_TOKEN_CANARY, USER_TOKEN_SECRET_CANARY, COMET_CANARY)
CREDENTIALS = {"hf_token": HF_CANARY, "wandb_api_key": WANDB_CANARY, "user_token": USER_TOKEN_CANARY, "comet_api_key": COMET_CANARY}


@pytest.fixture(autouse=True)
def _user_tokens_checked(env):
    env["FINETUNE_USER_TOKEN_SECRET"] = USER_TOKEN_SECRET_CANARY


def assert_clean_text(text: str, where: str) -> None:
    for canary in CANARIES:
        assert canary not in text, f"{canary} leaked into {where}"


def assert_clean_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for canary in CANARIES:
                assert canary.encode() not in data, f"{canary} leaked into {path}"


class ArgvWatcher:
    """Reads every process's command line every 50 ms while a job runs."""

    def __init__(self):
        self.hits: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        cmdline = (entry / "cmdline").read_bytes()
                    except OSError:
                        continue
                    self.hits += [c for c in CANARIES if c.encode() in cmdline]
            self.scans += 1
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_dir(volume: Path, job: dict) -> Path:
    return volume / "runs" / job["user_id"] / job["run_id"]


def test_a_succeeding_job_leaks_no_secret(tiny, env, volume, caplog):
    evaluation = {"dataset": {"rows": [{"prompt": "Q: What colour is a lime? A:", "completion": " A lime is green."}]}, "max_new_tokens": 4}
    job = make_job(tiny_args(tiny, num_epochs=3, save_steps=10), credentials=CREDENTIALS, evaluation=evaluation)
    generate = {"user_id": job["user_id"], "mode": "generate", "run_id": job["run_id"], "prompts": ["What colour is a lime?"],
                "max_new_tokens": 4, "credentials": {"hf_token": HF_CANARY, "user_token": USER_TOKEN_CANARY}}
    with caplog.at_level(logging.DEBUG), ArgvWatcher() as argv:
        evs = collect(job, {**env, "WANDB_MODE": "offline"})  # the W&B key turns W&B on
        evs += collect(generate, env)  # the run answers a prompt: the generate child holds the token too
        stopped = collect(generate, {**env, "FINETUNE_GENERATE_DEADLINE_S": "1"})  # stopped at its deadline: an error with its log tail
    assert evs[-1]["type"] == "result" and evs[-1]["mode"] == "generate", evs[-1]
    assert stopped[-1]["code"] == "deadline_exceeded", stopped[-1]
    evs += stopped
    assert list(run_dir(volume, job).glob("generations/*/generate.log")), "the generate child ran, so its files are searched too"
    assert (run_dir(volume, job) / "evaluation.log").is_file(), "the evaluation child ran, so its files are searched too"
    assert list(run_dir(volume, job).glob("wandb/offline-run-*")), "W&B ran, so its files are searched too"
    assert argv.scans > 10 and argv.hits == []
    assert_clean_text(json.dumps(evs), "events")
    assert_clean_text(caplog.text, "the worker log")
    assert_clean_tree(run_dir(volume, job))
    assert_clean_tree(volume / "cache")


@pytest.mark.parametrize("mode", ["preflight", "estimate"])
def test_a_preflight_leaks_no_secret(tiny, env, volume, caplog, mode):
    job = make_job(tiny_args(tiny), credentials=CREDENTIALS, mode=mode)
    with caplog.at_level(logging.DEBUG), ArgvWatcher() as argv:
        evs = collect(job, env)
    assert evs[-1]["type"] == "result" and evs[-1]["mode"] == mode and evs[-1]["estimate"]["rows"], evs[-1]
    assert argv.hits == []
    assert_clean_text(json.dumps(evs), "events")
    assert_clean_text(caplog.text, "the worker log")
    assert_clean_tree(run_dir(volume, job))


def test_a_job_failing_validation_leaks_no_secret(tiny, env, volume, caplog):
    args = tiny_args(tiny, lerning_rate=1, hf_token=HF_CANARY, comet_api_key=COMET_CANARY)
    job = make_job(args, credentials={**CREDENTIALS, "hf_tokn": WANDB_CANARY})
    with caplog.at_level(logging.DEBUG):
        evs = collect(job, env)
    assert evs[-1]["code"] in ("invalid_input", "invalid_config")
    assert_clean_text(json.dumps(evs), "events")
    assert_clean_text(caplog.text, "the worker log")
    assert not run_dir(volume, job).exists()


def test_a_crashing_training_leaks_no_secret(tiny, env, volume, caplog):
    broken = volume / "broken-for-canary"
    if not broken.exists():
        shutil.copytree(tiny / "tiny-llama", broken)
        (broken / "model.safetensors").write_bytes(b"junk")
    job = make_job(tiny_args(tiny, base_model=str(broken)), credentials=CREDENTIALS)
    with caplog.at_level(logging.DEBUG), ArgvWatcher() as argv:
        evs = collect(job, env)
    assert evs[-1]["code"] == "model_load_error" and evs[-1]["log_tail"]
    assert argv.hits == []
    assert_clean_text(json.dumps(evs), "events")
    assert_clean_tree(run_dir(volume, job))


def test_the_model_config_child_keeps_the_token_out_of_the_worker(tiny, env, volume, caplog, tmp_path):
    from fake_hub import FakeHub, user
    from finetune_worker.host.hardware import CPU_ONLY

    hub = FakeHub().start()
    try:
        hub.tokens[HF_CANARY] = user("alice", role="read")
        hub.add_model("acme/gated-canary", {"config.json": b"{}"}, gated=True)
        seen_tokens: list[str] = []
        original = hub._resolve

        def resolve(who, bad_token, *args):
            seen_tokens.append(who["name"] if who else "")
            return original(who, bad_token, *args)

        hub._resolve = resolve
        job = make_job(tiny_args(tiny, base_model="acme/gated-canary"), credentials=CREDENTIALS)
        hub_env = {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
        with caplog.at_level(logging.DEBUG), ArgvWatcher() as argv:
            evs = collect(job, hub_env, hardware=CPU_ONLY)
    finally:
        hub.close()
    assert evs[-1]["code"] == "auth_error" and "acme/gated-canary" in evs[-1]["message"], evs[-1]
    assert seen_tokens and set(seen_tokens) == {"alice"}, "the child sent the job's token to the Hub"
    assert argv.hits == [] and HF_CANARY not in os.environ.values()
    assert_clean_text(json.dumps(evs), "events")
    assert_clean_text(caplog.text, "the worker log")
    assert_clean_tree(tmp_path / "hf-home")


def test_a_secret_in_an_unexpected_exception_is_redacted_from_event_and_log(tiny, env, monkeypatch, caplog):
    from finetune_worker import pipeline

    def explode(paths):
        raise RuntimeError(f"unexpected failure while holding {HF_CANARY}")

    monkeypatch.setattr(pipeline, "inspect_previous", explode)
    with caplog.at_level(logging.DEBUG):
        evs = collect(make_job(tiny_args(tiny), credentials=CREDENTIALS), env)
    assert evs[-1]["code"] == "internal_error"
    assert "Traceback" not in json.dumps(evs)
    assert "RuntimeError" in caplog.text and "***" in caplog.text
    assert_clean_text(json.dumps(evs), "events")
    assert_clean_text(caplog.text, "the worker log and its traceback")


def test_a_secret_printed_by_the_training_is_redacted_in_the_log(tiny, env, volume):
    """Axolotl could print anything: the log pipe is redacted line by line."""
    job = make_job(tiny_args(tiny, max_steps=3, wandb_project=f"project-{WANDB_CANARY}"), credentials=CREDENTIALS)
    evs = collect(job, {**env, "WANDB_MODE": "offline"})
    assert_clean_text(json.dumps(evs), "events")
    assert_clean_text((run_dir(volume, job) / "train.log").read_text(), "train.log")
    debug_log = run_dir(volume, job) / "output" / "debug.log"
    assert debug_log.is_file(), "Axolotl tees its log into output/debug.log: searched too"
    assert_clean_text(debug_log.read_text(), "Axolotl's debug.log")


SERVE_KEY_CANARY = "CANARYserveApiKey00000000000000000001"


def test_the_serve_api_key_reaches_vllm_through_its_environment_only(tmp_path, capsys):
    """`finetune-worker serve` with FINETUNE_SERVE_API_KEY: vLLM cannot run on this machine (no
    CUDA), so a stand-in `vllm` program on PATH records the argv and environment it was given
    and exits; the key must be in VLLM_API_KEY (which vLLM reads) and nowhere else."""
    import sys

    from finetune_worker.serve.server import serve

    seen = tmp_path / "seen.json"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "vllm"
    stand_in.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"open({str(seen)!r}, 'w').write(json.dumps({{'argv': sys.argv, 'env': dict(os.environ)}}))\nsys.exit(3)\n")
    stand_in.chmod(0o755)
    run = tmp_path / "pod"
    (run / "outputs").mkdir(parents=True)
    (run / "config.yaml").write_text(f"base_model: org/base\nadapter: lora\nlora_r: 8\noutput_dir: {run / 'outputs'}\n")
    (run / "outputs" / "adapter_config.json").write_text("{}")
    env = {"PATH": str(bin_dir), "FINETUNE_SERVE_API_KEY": SERVE_KEY_CANARY}
    assert serve(str(run), runs_dir=tmp_path, env=env, host="0.0.0.0", port=1, server="vllm") == 1
    recorded = json.loads(seen.read_text())
    assert recorded["env"]["VLLM_API_KEY"] == SERVE_KEY_CANARY and "FINETUNE_SERVE_API_KEY" not in recorded["env"]
    assert SERVE_KEY_CANARY not in json.dumps(recorded["argv"])
    printed = capsys.readouterr()
    assert "with an API key" in printed.out and SERVE_KEY_CANARY not in printed.out + printed.err
    # transformers serve cannot check a key: refused before anything starts, the key not repeated
    assert serve(str(run), runs_dir=tmp_path, env=env, server="transformers") == 2
    printed = capsys.readouterr()
    assert "transformers serve has no API key" in printed.err and SERVE_KEY_CANARY not in printed.out + printed.err
