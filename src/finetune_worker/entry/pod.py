"""Pod mode: the same image started as a RunPod Pod, configured from AXOLOTL_* variables.

    finetune-worker configure --from-env --output config.yaml   # validate and write the YAML
    finetune-worker pod                                          # what the image runs on a Pod
    finetune-worker serve /workspace/finetune                    # serve its trained output (AXOLOTL_SERVE=true: after training)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune_worker.checks.args import ArgsContext, check_args
from finetune_worker.checks.distributed import cluster_storage_problems
from finetune_worker.checks.paths import PathRoots
from finetune_worker.contract.envconfig import args_from_env, name_problems_by_variable
from finetune_worker.contract.errors import Problem
from finetune_worker.contract.settings import WorkerSettings
from finetune_worker.host.hardware import Hardware
from finetune_worker.host.rundir import json_digest, write_config
from finetune_worker.plan.cluster import cluster_from_env
from finetune_worker.plan.config import PROGRESS_PLUGIN
from finetune_worker.run import cluster as cluster_node

WELCOME = """\
=====================================================================
 finetune-worker Pod: Axolotl {axolotl} ready
=====================================================================
 Config:      {config}
 Outputs:     {outputs}
 Hugging Face: {hf}

 Next:
   axolotl train {config}
   (a node of a cluster: AXOLOTL_AUTORUN=true, or finetune-worker cluster job.json, on every node)
   axolotl preprocess {config}      # tokenize and inspect the data first
   finetune-worker run job.json     # or run a worker job on this Pod
   finetune-worker serve {pod_dir}  # then serve the result (OpenAI API on port 8000)

 Change the config: set AXOLOTL_* variables on the Pod and restart it, or
   finetune-worker configure --from-env --output {config}
 Keep your data under {pod_dir} (on the volume); never mount a volume over /workspace itself.
=====================================================================
"""


def pod_roots(cwd: Path) -> PathRoots:
    """On a Pod the user owns the machine: any path is allowed, relative ones from cwd."""
    return PathRoots(allowed=(Path("/"),), lookup=(cwd.resolve(),))


def configure_from_env(env: Mapping[str, str], hardware: Hardware, cwd: Path, template: dict[str, Any] | None = None) -> tuple[dict, list[Problem]]:
    """Template values, overridden by AXOLOTL_* variables, checked like a job's args."""
    env_args, origin, problems = args_from_env(env)
    config = {**(template or {}), **env_args}
    if not config:
        return {}, [Problem("AXOLOTL_*", "no AXOLOTL_* variables are set (for example AXOLOTL_BASE_MODEL=NousResearch/Llama-3.2-1B)")]
    checked, arg_problems = check_args(config, ArgsContext(roots=pod_roots(cwd), hardware=hardware, allow_trust_remote_code=True, shared=False))
    return checked, problems + name_problems_by_variable(arg_problems, origin)


def default_pod_dir(env: Mapping[str, str]) -> Path:
    if env.get("FINETUNE_POD_DIR"):
        return Path(env["FINETUNE_POD_DIR"])
    return Path("/workspace/finetune") if Path("/workspace").is_dir() else Path.cwd() / "pod"


def training_launch(env: Mapping[str, str], config: dict, config_file: Path, pod_dir: Path, gpu_count: int) -> tuple[list[str], dict[str, str]]:
    """How AXOLOTL_AUTORUN trains: `axolotl train CONFIG` on one machine; on a node of a
    cluster (RunPod Instant Clusters, dstack, SkyPilot, torchrun variables) the same torchrun
    launch as `finetune-worker cluster`, the nodes agreeing on the config and the stack first.
    Raises ValueError with every problem when the cluster or the config cannot run."""
    plan, problems = cluster_from_env(env, gpu_count)
    if problems:
        raise ValueError("; ".join(map(str, problems)))
    if plan is None:
        return ["axolotl", "train", str(config_file)], dict(env)
    settings = WorkerSettings.from_env(env)
    if problems := cluster_storage_problems(config, settings.shared_volume):
        raise ValueError("; ".join(map(str, problems)))
    config = {**config, "plugins": [*(p for p in config.get("plugins") or [] if p != PROGRESS_PLUGIN), PROGRESS_PLUGIN]}
    write_config(config_file, config)
    home = pod_dir if plan.primary else pod_dir / "nodes" / f"node-{plan.node_rank}"
    files = cluster_node.NodeFiles(home, pod_dir / "nodes", Path(config["output_dir"]), config_file, plan.node_rank)
    digest = json_digest(config)
    return cluster_node.prepare_launch(
        plan, files, job_sha256=digest, config_sha256=digest, shared_volume=settings.shared_volume,
        timeout_s=cluster_node.process_group_timeout(settings.cluster_timeout_s, config),
        join_timeout_s=settings.cluster_join_timeout_s, child_env=dict(env),
    )


def hf_login(token: str | None) -> str:
    if not token:
        return "not logged in (set HF_TOKEN on the Pod to push and to read gated models)"
    from huggingface_hub import HfApi, login

    try:
        user = HfApi(token=token).whoami().get("name", "?")
    except Exception as exc:  # noqa: BLE001 - shown to the person on the Pod
        return f"HF_TOKEN was refused ({type(exc).__name__}); not logged in"
    login(token=token, add_to_git_credential=False)
    return f"logged in as {user}"


def start_pod(env: Mapping[str, str]) -> int:
    from finetune_worker.host.hardware import detect_hardware

    pod_dir = default_pod_dir(env)
    pod_dir.mkdir(parents=True, exist_ok=True)
    config_file = pod_dir / "config.yaml"
    config, problems = configure_from_env(env, detect_hardware(), Path.cwd())
    if problems and config:
        print("The AXOLOTL_* variables do not make a valid config:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
    elif config:
        config.setdefault("output_dir", str(pod_dir / "outputs"))
        config.setdefault("dataset_prepared_path", str(pod_dir / "prepared"))
        write_config(config_file, config)
    import importlib.metadata

    print(WELCOME.format(
        axolotl=importlib.metadata.version("axolotl"), config=config_file, outputs=pod_dir / "outputs",
        hf=hf_login(env.get("HF_TOKEN")), pod_dir=pod_dir,
    ), flush=True)
    ready = bool(config) and not problems
    serving = _truthy(env.get("AXOLOTL_SERVE"))
    if ready and _truthy(env.get("AXOLOTL_AUTORUN")):
        try:
            argv, train_env = training_launch(env, config, config_file, pod_dir, detect_hardware().gpu_count)
        except ValueError as exc:
            print(f"Not training: {exc}", file=sys.stderr, flush=True)
            argv, serving = None, False
        if argv and not serving:
            os.execvpe(argv[0], argv, train_env)
        code = subprocess.call(argv, env=train_env) if argv else 1
        if code != 0:
            print(f"the training exited with code {code}; not serving. The Pod stays up.", file=sys.stderr, flush=True)
            serving = False
    if serving and config_file.exists():
        serve_pod(pod_dir, env)
    while True:  # keep the Pod up for interactive use
        signal.pause()


def _truthy(value: str | None) -> bool:
    return str(value or "").lower() in ("1", "true", "yes")


def serve_pod(pod_dir: Path, env: Mapping[str, str]) -> int:
    """AXOLOTL_SERVE: serve the Pod's run on 0.0.0.0:AXOLOTL_SERVE_PORT (8000), as the
    original Pod workflow's vLLM start script did; with FINETUNE_SERVE_API_KEY set on the
    Pod, vLLM requires it (serve reads it from `env`)."""
    from finetune_worker.serve.server import serve

    port = int(env.get("AXOLOTL_SERVE_PORT") or 8000)
    return serve(str(pod_dir), runs_dir=WorkerSettings.from_env(env).runs_dir, env=env, host="0.0.0.0", port=port)


