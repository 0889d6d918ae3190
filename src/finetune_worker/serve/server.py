"""`finetune-worker serve RUN`: an OpenAI-compatible server on a finished run (Pod mode).

vLLM where it is installed (an adapter with --enable-lora, or full weights), else
transformers' own `transformers serve` (full weights: a LoRA is merged first with
Axolotl's merge-lora). The argv comes from plan/serving.py; the server runs in its own
process group, is health-checked before it is called ready, and is stopped whole.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from finetune_worker.contract.errors import JobError
from finetune_worker.host.children import die_with_parent, group_members, stop_process_group
from finetune_worker.host.rundir import copy_run_tokenizer, has_weights
from finetune_worker.plan.children import build_merge_argv
from finetune_worker.plan.serving import (
    SERVE_API_KEY,
    TRANSFORMERS,
    VLLM,
    VLLM_API_KEY,
    Served,
    build_server_argv,
    serve_api_key,
    serve_options,
    server_env,
    with_overrides,
)
from finetune_worker.serve.target import RunOutput, finished_run, run_in_directory

STARTUP_TIMEOUT_S = {VLLM: 1200.0, TRANSFORMERS: 600.0}  # vLLM downloads and compiles first
HEALTH_POLL_S = 0.5
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServeFailed(RuntimeError):
    """The run cannot be served; the message says why and what to do."""


def find_run(where: str, runs_dir: Path, checkpoint: str | int) -> RunOutput:
    """RUN: a directory holding config.yaml (a worker run, or a Pod's directory), or USER/RUN_ID on the volume."""
    path = Path(where)
    if path.is_dir():
        return run_in_directory(path, checkpoint)
    if where.count("/") == 1 and not where.startswith(("/", ".")):
        user_id, run_id = where.split("/")
        return finished_run(runs_dir, user_id, run_id, checkpoint)
    raise ServeFailed(f"{where}: no such directory; give a run directory (with config.yaml) or USER/RUN_ID of a run under {runs_dir}")


def choose_server(requested: str, env: Mapping[str, str]) -> str:
    if requested != "auto":
        return requested
    return VLLM if _program("vllm", env) else TRANSFORMERS


def served_weights(target: RunOutput, server: str) -> Served:
    if server == VLLM:
        return Served(target.base_model, adapter=str(target.model_dir)) if target.adapter else Served(str(target.model_dir))
    full = target.full_weights
    if full is None:
        raise ServeFailed("transformers serve loads full weights, and this LoRA run has none merged yet")
    return Served(str(full))


def merge_adapter(target: RunOutput, env: Mapping[str, str], out: TextIO) -> RunOutput:
    """Axolotl's merge-lora into <output_dir>/merged (for transformers serve), once."""
    if target.merged_dir is not None or not target.adapter:
        return target
    if target.checkpoint != "final":
        raise ServeFailed("transformers serve needs full weights and only a run's final adapter is merged; "
                          "serve the final output, or install vLLM to serve a checkpoint's adapter")
    log = target.run_dir / "merge.log"
    print(f"merging the LoRA adapter into its base model for transformers serve (log: {log})", file=out, flush=True)
    with open(log, "ab") as handle:
        without_key = {name: value for name, value in env.items() if name not in (SERVE_API_KEY, VLLM_API_KEY)}
        code = subprocess.call(build_merge_argv(sys.executable, target.config_file, target.model_dir), env=without_key,
                               stdout=handle, stderr=subprocess.STDOUT, cwd=target.run_dir)
    merged = target.model_dir / "merged"
    if code != 0 or not has_weights(merged):
        raise ServeFailed(f"merge-lora failed (exit {code}); see {log}")
    copy_run_tokenizer(target.model_dir, merged)
    return replace(target, merged_dir=merged)


def wait_until_healthy(process: subprocess.Popen, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(HEALTH_POLL_S)
    return False


def serve(where: str, *, runs_dir: Path, env: Mapping[str, str], host: str = "127.0.0.1", port: int = 8000,
          checkpoint: str | int = "final", server: str = "auto", out: TextIO | None = None) -> int:
    """Serve a run until SIGTERM/SIGINT (or the server exits); the exit code. Lines go to `out` (sys.stdout at the call)."""
    out = out or sys.stdout
    try:
        target = find_run(where, runs_dir, checkpoint)
        server = choose_server(server, env)
        environment = server_env(server, env)  # before any merge: a key transformers cannot check stops here
        if server == TRANSFORMERS:
            target = merge_adapter(target, env, out)
        options, problems = with_overrides(serve_options(target.config, target.served_name, target.lora_rank, target.adapter), env)
        if problems:
            raise ServeFailed("; ".join(problems))
        served = served_weights(target, server)
        argv = build_server_argv(server, served, options, host, port)
    except (JobError, ServeFailed, ValueError) as exc:
        print(f"finetune-worker serve: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    program = _program(argv[0], env)
    if program is None:
        print(f"finetune-worker serve: {argv[0]} is not installed here (not in {Path(sys.executable).parent} or on PATH)", file=sys.stderr)
        return 2
    argv[0] = program
    keyed = serve_api_key(env) is not None
    print(f"starting {server}: {' '.join(argv)}" + (" (with an API key)" if keyed else ""), file=out, flush=True)
    if not keyed and host not in LOOPBACK_HOSTS:
        print(f"finetune-worker serve: no API key: anyone who reaches {host}:{port} can use the model; set {SERVE_API_KEY} "
              "(vLLM) to require one", file=sys.stderr, flush=True)
    process = subprocess.Popen(argv, env=environment, start_new_session=True, preexec_fn=die_with_parent)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        base = f"http://{host}:{port}"
        if not wait_until_healthy(process, f"{base}/health", STARTUP_TIMEOUT_S[server]):
            print(f"finetune-worker serve: {server} did not become healthy (exit code {process.poll()})", file=sys.stderr)
            return 1
        name = options.served_model_name if server == VLLM else served.model
        print(json.dumps({"ready": f"{base}/v1", "model": name, "server": server, "pid": process.pid, "run": target.name,
                          "checkpoint": target.checkpoint, "api_key": keyed}), file=out, flush=True)
        while not stop.is_set() and process.poll() is None:
            stop.wait(0.5)
        return 0 if stop.is_set() else (process.returncode or 1)
    finally:
        if group_members(process.pid):
            stop_process_group(process.pid)
        process.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _program(name: str, env: Mapping[str, str]) -> str | None:
    """The program in this interpreter's environment first (a venv's bin), then on PATH."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)]))
