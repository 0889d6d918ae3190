"""Pure translations: checked job -> Axolotl config, and -> the child's argv and env.

Nothing here reads globals, files or the environment: every input is an argument.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .hardware import Hardware

PROGRESS_PLUGIN = "finetune_worker.progress_plugin.ProgressPlugin"
PROGRESS_FILE_ENV = "FINETUNE_PROGRESS_FILE"

# Read by the worker, which publishes after a successful run; never given to Axolotl
# (the HF Trainer would create the repo up front and push on every save).
PUBLISH_KEYS = ("hub_model_id", "hub_strategy", "hub_revision", "hub_private_repo")

# Axolotl features that need CUDA: turned off on a machine without a GPU.
CUDA_ONLY_FLAGS = (
    "bf16", "fp16", "tf32", "flash_attention", "sample_packing", "eval_sample_packing",
    "flash_attn_cross_entropy", "flash_attn_rms_norm", "flash_attn_fuse_qkv", "flash_attn_fuse_mlp",
    "xformers_attention", "sage_attention", "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel",
)
CPU_OPTIMIZER = "adamw_torch"
CUDA_OPTIMIZER_MARKERS = ("8bit", "bnb", "paged", "apex", "fused", "ao_", "4bit")

# Environment variables the child must not inherit: RunPod's job-queue addresses and keys.
WORKER_ONLY_ENV_PREFIXES = ("RUNPOD_WEBHOOK_",)
WORKER_ONLY_ENV = (
    "RUNPOD_AI_API_KEY", "RUNPOD_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "COMET_API_KEY", "SWANLAB_API_KEY",
    "FINETUNE_USER_TOKEN_SECRET",
)


@dataclass(frozen=True)
class RunPaths:
    """Everything a run writes lives under its run directory."""

    run_dir: Path

    @property
    def config_file(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def job_file(self) -> Path:
        return self.run_dir / "job.json"

    @property
    def events_file(self) -> Path:
        return self.run_dir / "events.jsonl"

    @property
    def progress_file(self) -> Path:
        return self.run_dir / "progress.jsonl"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "train.log"

    @property
    def output_dir(self) -> Path:
        return self.run_dir / "output"

    @property
    def result_file(self) -> Path:
        return self.run_dir / "result.json"

    @property
    def trained_file(self) -> Path:
        """Written when training completed: a resubmission only publishes."""
        return self.run_dir / "trained.json"

    @property
    def loss_curve(self) -> Path:
        return self.run_dir / "loss.png"

    @property
    def hub_dir(self) -> Path:
        return self.run_dir / "hub"

    @property
    def data_dir(self) -> Path:
        """Datasets sent inline or by URL, written here before Axolotl reads them."""
        return self.run_dir / "data"

    @property
    def evaluation_file(self) -> Path:
        return self.run_dir / "evaluation.json"

    @property
    def preflight_file(self) -> Path:
        return self.run_dir / "preflight.json"

    @property
    def lock_file(self) -> Path:
        # Beside the run directory, so it can be held before the directory exists
        # and while an earlier attempt is moved aside.
        return self.run_dir.with_name(f"{self.run_dir.name}.lock")


def run_paths(runs_dir: Path, user_id: str, run_id: str) -> RunPaths:
    return RunPaths(runs_dir / user_id / run_id)


@dataclass(frozen=True)
class DataSource:
    """A dataset the worker writes into the run directory before Axolotl reads it."""

    where: str  # "args.datasets[0]"
    dest: Path
    rows: list | None = None
    url: str | None = None


@dataclass(frozen=True)
class AxolotlPlan:
    config: dict[str, Any]
    warnings: list[str]
    publish: dict[str, Any]
    adapted_for_cpu: list[str]
    data_sources: list[DataSource] = field(default_factory=list)


@dataclass(frozen=True)
class Tracking:
    """W&B is on when the job or the worker has a key; TensorBoard always."""

    wandb_key: bool = False
    model_id: str = ""
    run_id: str = ""


def build_axolotl_config(
    args: dict[str, Any], paths: RunPaths, prepared_dir: Path, hardware: Hardware, tracking: Tracking = Tracking()
) -> AxolotlPlan:
    config = copy.deepcopy(args)
    warnings: list[str] = []
    warnings += apply_tracking(config, tracking)
    publish = {key: config.pop(key) for key in PUBLISH_KEYS if key in config}
    for key, value in {"output_dir": str(paths.output_dir), "dataset_prepared_path": str(prepared_dir)}.items():
        if key in config and config[key] != value:
            warnings.append(f"args.{key} is set by the worker: {config[key]!r} was replaced with {value!r}")
        config[key] = value
    if PROGRESS_PLUGIN in (config.get("plugins") or []):
        warnings.append(f"args.plugins: {PROGRESS_PLUGIN} is added by the worker; remove it from your config")
    config["plugins"] = [p for p in config.get("plugins") or [] if p != PROGRESS_PLUGIN] + [PROGRESS_PLUGIN]
    sources = localise_datasets(config, paths.data_dir)
    changed: list[str] = []
    if not hardware.has_gpu:
        changed = adapt_for_cpu(config)
        if changed:
            warnings.append("no CUDA GPU on this worker, so the config was adapted to run on CPU: " + "; ".join(changed))
    return AxolotlPlan(config=config, warnings=warnings, publish=publish, adapted_for_cpu=changed, data_sources=sources)


# The dataset lists whose entries may carry inline rows or an https URL.
INLINE_DATASET_KEYS = ("datasets", "test_datasets")
KNOWN_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt")


def localise_datasets(config: dict[str, Any], data_dir: Path) -> list[DataSource]:
    """Point inline-rows and https datasets at files in the run directory (in place)."""
    sources = []
    for key in INLINE_DATASET_KEYS:
        for index, entry in enumerate(config.get(key) or []):
            where = f"args.{key}[{index}]"
            if "rows" in entry:
                dest = data_dir / f"{key}-{index}.jsonl"
                sources.append(DataSource(where, dest, rows=entry.pop("rows")))
                entry.update(path=str(dest), ds_type="json")
            elif str(entry.get("path", "")).lower().startswith("https://"):  # HTTPS:// too: never left to Axolotl
                suffix = Path(urlsplit(entry["path"]).path).suffix.lower()
                dest = data_dir / f"{key}-{index}{suffix if suffix in KNOWN_DATA_SUFFIXES else '.jsonl'}"
                sources.append(DataSource(where, dest, url=entry["path"]))
                entry["path"] = str(dest)
    return sources


WANDB_KEYS = ("wandb_project", "wandb_entity", "wandb_name", "wandb_run_id", "wandb_watch", "wandb_log_model", "wandb_mode")


def apply_tracking(config: dict[str, Any], tracking: Tracking) -> list[str]:
    """TensorBoard logs by default; W&B only with a key (project defaults to the model id)."""
    config.setdefault("use_tensorboard", True)
    if tracking.wandb_key:
        config.setdefault("wandb_project", tracking.model_id)
        config.setdefault("wandb_name", tracking.run_id)
        return []
    dropped = [key for key in WANDB_KEYS if config.pop(key, None) is not None]
    if dropped:
        return [f"W&B is off: no wandb_api_key in the job or the worker's environment, so {', '.join(dropped)} was ignored"]
    return []


def adapt_for_cpu(config: dict[str, Any]) -> list[str]:
    """Turn off CUDA-only features in place; return what a user-set value became."""
    changed = []
    for flag in CUDA_ONLY_FLAGS:
        if config.get(flag) not in (None, False):
            changed.append(f"{flag}: {config[flag]!r} -> false")
        config[flag] = False
    optimizer = config.get("optimizer")
    if optimizer is None or any(marker in str(optimizer) for marker in CUDA_OPTIMIZER_MARKERS):
        if optimizer is not None:
            changed.append(f"optimizer: {optimizer!r} -> {CPU_OPTIMIZER!r}")
        config["optimizer"] = CPU_OPTIMIZER
    return changed


def build_train_argv(python: str, config_file: Path, num_processes: int = 1, port: int = 29500) -> list[str]:
    """`axolotl train`, as a module run by the worker's own interpreter; with several
    processes, under `accelerate launch` (torchrun underneath: one process per GPU).
    Mixed precision stays Axolotl's to choose (its bf16/fp16 override the launcher's)."""
    train = ["-m", "axolotl.cli.train", str(config_file)]
    if num_processes > 1:
        launch = [
            "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
        ]
        return [python, *launch, *train]
    return [python, *train]


def build_child_env(
    base_env: Mapping[str, str],
    *,
    paths: RunPaths,
    cache_dir: Path,
    package_root: Path,
    hf_token: str | None,
    wandb_api_key: str | None,
    other_secrets: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The child's environment: the worker's, minus its own secrets, plus this job's."""
    env = {
        key: value
        for key, value in base_env.items()
        if key not in WORKER_ONLY_ENV and not key.startswith(WORKER_ONLY_ENV_PREFIXES)
    }
    env.update(
        AXOLOTL_DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        **{PROGRESS_FILE_ENV: str(paths.progress_file)},
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
    env.update(other_secrets or {})
    return env


@dataclass(frozen=True)
class Speedups:
    """What the GPU worker's image offers, found by the pipeline (cheap checks, no imports)."""

    flash_attn: bool = False
    liger: bool = False
    model_type: str | None = None
    fits_without_checkpointing: bool = True


LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
LIGER_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "granite")
ATTENTION_KEYS = ("flash_attention", "sdp_attention", "xformers_attention", "flex_attention", "sage_attention", "eager_attention", "attn_implementation")


def apply_fast_defaults(config: dict[str, Any], hardware: Hardware, speedups: Speedups) -> list[str]:
    """On a GPU, what experienced Axolotl users set for speed, where the job left it unset.

    Changes `config` in place and returns each default as "key: value" for a status event.
    """
    if not hardware.has_gpu:
        return []
    chosen: dict[str, Any] = {}

    def default(key: str, value: Any) -> None:
        if config.get(key) is None:
            config[key] = chosen[key] = value

    if not any(config.get(key) for key in ATTENTION_KEYS):
        default("attn_implementation", "flash_attention_2" if speedups.flash_attn else "sdpa")
    # Axolotl keeps packed samples from attending to each other only with flash attention.
    packs_cleanly = config.get("attn_implementation") == "flash_attention_2" or bool(config.get("flash_attention"))
    if packs_cleanly and not config.get("rl") and not config.get("pretraining_dataset"):
        default("sample_packing", True)
        if config.get("sample_packing"):
            default("pad_to_sequence_len", True)
    if config.get("bf16") in (None, "auto") and config.get("fp16") is None:
        config["bf16"] = chosen["bf16"] = bool(hardware.bf16)
        if not hardware.bf16:
            default("fp16", True)
    if speedups.liger and speedups.model_type in LIGER_MODEL_TYPES and LIGER_PLUGIN not in (config.get("plugins") or []):
        config["plugins"] = [LIGER_PLUGIN, *(config.get("plugins") or [])]
        chosen["plugins"] = f"+ {LIGER_PLUGIN}"
        for key in ("liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_fused_linear_cross_entropy"):
            default(key, True)
    if not speedups.fits_without_checkpointing:
        default("gradient_checkpointing", True)
    default("save_total_limit", 2)
    return [f"{key}: {value}" for key, value in chosen.items()]
