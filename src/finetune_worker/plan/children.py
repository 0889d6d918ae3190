"""Every child process of a job, built from the plan: argv lists and environments.

Pure: every input is an argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from finetune_worker.contract.settings import LIMIT_SETTINGS, SECRET_ENV_VARS, WORKER_ONLY_ENV_PREFIXES
from finetune_worker.host.rundir import RunPaths
from finetune_worker.plan.cluster import ClusterPlan

PROGRESS_FILE_ENV = "FINETUNE_PROGRESS_FILE"
STEP_LIMIT_ENV = LIMIT_SETTINGS["max_steps"]  # the progress plugin enforces it in the child
RUN_BYTES_LIMIT_ENV = LIMIT_SETTINGS["max_run_bytes"]  # the progress plugin checks it at each checkpoint
STOP_FILE_ENV = "FINETUNE_STOP_FILE"  # the progress plugin saves a checkpoint and stops once this file exists
CLUSTER_STATUS_FILE_ENV = "FINETUNE_CLUSTER_STATUS_FILE"  # where a cluster's rank children say joined / mismatch / fault
CLUSTER_TRAINING_ARGS_ENV = "FINETUNE_CLUSTER_TRAINING_ARGS"  # TrainingArguments the progress plugin adds on a cluster
CLUSTER_RUN_ID = "finetune-worker"  # torchrun's --rdzv_id: the same on every node (the handshake tells jobs apart)


# The child processes a job runs, each `python -m <module>`; every argv is built here.
TRAIN_MODULE = "axolotl.cli.train"
MERGE_MODULE = "axolotl.cli.merge_lora"
STANDBY_MODULE = "finetune_worker.run.standby"
CLUSTER_RANK_MODULE = "finetune_worker.run.cluster_rank"
HUB_MODULE = "finetune_worker.publish.hub"
PREFLIGHT_MODULE = "finetune_worker.data.preflight"
EVALUATION_MODULE = "finetune_worker.publish.evaluation"
EXPORT_MODULE = "finetune_worker.publish.export"
BUCKET_MODULE = "finetune_worker.host.bucket"


def build_train_argv(python: str, config_file: Path, num_processes: int = 1, port: int = 29500) -> list[str]:
    """`axolotl train`, as a module run by the worker's own interpreter; with several
    processes, under `accelerate launch` (torchrun underneath: one process per GPU).
    Mixed precision stays Axolotl's to choose (its bf16/fp16 override the launcher's)."""
    train = ["-m", TRAIN_MODULE, str(config_file)]
    if num_processes > 1:
        launch = [
            "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
        ]
        return [python, *launch, *train]
    return [python, *train]


def build_torchrun_argv(python: str, plan: ClusterPlan, config_file: Path, spec_file: Path, join_timeout_s: int) -> list[str]:
    """torch.distributed's own launcher on one node of a cluster: the static rendezvous
    (node 0's agent hosts it; RunPod's clusters support no other), one fixed run id, no
    restarts (a lost node cannot be replaced: the whole cluster is relaunched and resumes),
    and the worker's rank child in front of Axolotl on every GPU."""
    return [
        python, "-m", "torch.distributed.run",
        "--nnodes", str(plan.nodes), "--node_rank", str(plan.node_rank), "--nproc_per_node", str(plan.processes_per_node),
        "--rdzv_backend", "static", "--rdzv_endpoint", plan.endpoint, "--rdzv_id", CLUSTER_RUN_ID,
        "--rdzv_conf", f"timeout={join_timeout_s}", "--max_restarts", "0",
        "-m", CLUSTER_RANK_MODULE, str(config_file), "--spec", str(spec_file),
    ]


def build_standby_argv(python: str, config_file: Path) -> list[str]:
    """A training child that imports Axolotl now and trains when told to (see standby.py)."""
    return [python, "-m", STANDBY_MODULE, str(config_file)]


def build_merge_argv(python: str, config_file: Path, output_dir: Path) -> list[str]:
    """Axolotl's merge-lora: the adapter in output_dir merged into <output_dir>/merged."""
    return [python, "-m", MERGE_MODULE, str(config_file), f"--lora_model_dir={output_dir}"]


def build_tool_argv(python: str, module: str, *args: str, out: Path) -> list[str]:
    """A helper child that writes one JSON object to `out` (Hub steps, preflight, evaluation)."""
    return [python, "-m", module, *args, "--out", str(out)]


def build_hub_argv(python: str, command: str, *args: str, out: Path) -> list[str]:
    return build_tool_argv(python, HUB_MODULE, command, *args, out=out)


def build_model_config_argv(python: str, model: str, revision: str | None, out: Path) -> list[str]:
    """The base model's config.json (and weights' index) from the Hub, before any weights."""
    return build_hub_argv(python, "model-config", "--model", model, *(["--revision", revision] if revision else []), out=out)


def build_preflight_argv(python: str, config_file: Path, out: Path, standby: bool = False) -> list[str]:
    """The preflight child; on standby it imports first and tokenizes when told to."""
    return [*build_tool_argv(python, PREFLIGHT_MODULE, str(config_file), out=out), *(["--standby"] if standby else [])]


def build_evaluation_argv(python: str, spec_file: Path, out: Path) -> list[str]:
    return build_tool_argv(python, EVALUATION_MODULE, str(spec_file), out=out)


def build_export_argv(python: str, spec_file: Path, out: Path) -> list[str]:
    """Axolotl's GGUF export (`axolotl export`) of the spec's model, with the worker's llama.cpp."""
    return build_tool_argv(python, EXPORT_MODULE, str(spec_file), out=out)


def build_bucket_argv(python: str, command: str, uri: str, endpoint_url: str | None, region: str | None, *args: str,
                      out: Path) -> list[str]:
    """The storage child (host/bucket.py): probe, put, find or get under `uri`."""
    where = [*(["--endpoint-url", endpoint_url] if endpoint_url else []), *(["--region", region] if region else [])]
    return build_tool_argv(python, BUCKET_MODULE, command, "--uri", uri, *where, *args, out=out)


def hub_cache_dir(child_env: Mapping[str, str]) -> Path:
    """Where the children find the Hugging Face Hub cache (HF_HUB_CACHE, else HF_HOME/hub)."""
    return Path(child_env.get("HF_HUB_CACHE") or Path(child_env["HF_HOME"]) / "hub")


def build_child_env(
    base_env: Mapping[str, str],
    *,
    paths: RunPaths,
    cache_dir: Path,
    package_root: Path,
    hf_token: str | None,
    wandb_api_key: str | None,
    other_secrets: Mapping[str, str] | None = None,
    step_limit: int | None = None,
    run_bytes_limit: int | None = None,
) -> dict[str, str]:
    """The child's environment: the worker's, minus its own secrets, plus this job's
    (and the operator's step and run-size limits, which the progress plugin enforces:
    the steps before step 1, the size at each checkpoint)."""
    env = {
        key: value
        for key, value in base_env.items()
        if key not in SECRET_ENV_VARS and not key.startswith(WORKER_ONLY_ENV_PREFIXES)
    }
    env.update(
        AXOLOTL_DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        **{PROGRESS_FILE_ENV: str(paths.progress_file), STOP_FILE_ENV: str(paths.stop_file)},
    )
    env.setdefault("HF_HOME", str(cache_dir / "huggingface"))
    python_path = [str(package_root), *filter(None, env.get("PYTHONPATH", "").split(":"))]
    env["PYTHONPATH"] = ":".join(dict.fromkeys(python_path))
    if hf_token:
        env["HF_TOKEN"] = hf_token
    if wandb_api_key:
        env["WANDB_API_KEY"] = wandb_api_key
    else:
        env["WANDB_MODE"] = "disabled"
    for name, limit in ((STEP_LIMIT_ENV, step_limit), (RUN_BYTES_LIMIT_ENV, run_bytes_limit)):
        env.pop(name, None)
        if limit:
            env[name] = str(limit)
    env.update(other_secrets or {})
    return env




GENERATE_MODULE = "finetune_worker.serve.generate"


def build_generate_argv(python: str, spec_file: Path, out: Path) -> list[str]:
    return build_tool_argv(python, GENERATE_MODULE, str(spec_file), out=out)
