"""Pure translations: checked job -> Axolotl config, and -> the child's argv and env.

Nothing here reads globals, files or the environment: every input is an argument.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .hardware import Hardware
from .options import INLINE_DATASET_KEYS
from .settings import SECRET_ENV_VARS, WORKER_ONLY_ENV_PREFIXES

PROGRESS_PLUGIN = "finetune_worker.progress_plugin.ProgressPlugin"
PROGRESS_FILE_ENV = "FINETUNE_PROGRESS_FILE"
STEP_LIMIT_ENV = "FINETUNE_MAX_STEPS"

# Read by the worker, which publishes after a successful run; never given to Axolotl
# (the HF Trainer would create the repo up front and push on every save).
PUBLISH_KEYS = ("hub_model_id", "hub_strategy", "hub_revision", "hub_private_repo")

# Axolotl features that need CUDA: turned off on a machine without a GPU.
CUDA_ONLY_FLAGS = (
    "bf16", "fp16", "tf32", "flash_attention", "sample_packing", "eval_sample_packing",
    "flash_attn_cross_entropy", "flash_attn_rms_norm", "flash_attn_fuse_qkv", "flash_attn_fuse_mlp",
    "xformers_attention", "sage_attention", "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel",
)
# Turned off on CPU only when set: unset, Axolotl leaves them off there.
CUDA_ONLY_WHEN_SET = ("fp8", "lora_embedding_kernel", "fused_attn_kernel", "flash_attn_d512", "gemma4_hybrid_attn_impl")
CPU_OPTIMIZER = "adamw_torch"
CUDA_OPTIMIZER_MARKERS = ("8bit", "bnb", "paged", "apex", "fused", "ao_", "4bit")
# Attention that runs on CPU; any other (flash, xformers, sage, fp8, Hub kernels) becomes CPU_ATTENTION.
CPU_ATTENTION_IMPLS = ("eager", "sdpa", "flex_attention")
CPU_ATTENTION = "sdpa"
CPU_LARGE_HEAD_ATTENTION = "sdpa"  # 'auto' and 'triton_flash' use a Triton kernel
# Axolotl integrations whose kernels need CUDA (Triton, CUDA extensions), with their options:
# dropped on CPU, options and all (tests/test_plan.py checks these lists against Axolotl's).
CUDA_ONLY_PLUGIN_OPTIONS = {
    "cut_cross_entropy": ("cut_cross_entropy",),
    "liger": (
        "liger_cross_entropy", "liger_fused_linear_cross_entropy", "liger_glu_activation", "liger_kernel_impl", "liger_layer_norm",
        "liger_rms_norm", "liger_rms_norm_gated", "liger_rope", "liger_swiglu", "liger_use_token_scaling",
    ),
    "kernels": (
        "dsv4_bf16_all", "dsv4_fp4_grouped_mode", "dsv4_fp8_lora_kernel", "dsv4_fp8_nonexpert_mode", "dsv4_shared_mlp_lora_kernel",
        "expert_backend", "gemma4_fp8_nonexpert", "gemma4_nf4_nonexpert", "moe_bnb_fast", "moe_dequant_chunk_size",
        "moe_grouped_backend", "nonexpert_quantization", "nvfp4_merge_aware", "nvfp4_merge_aware_start_step", "use_dsv4_kernels",
        "use_glm_dsa_kernels", "use_scattermoe", "use_sonicmoe",
    ),
    "expert_parallel": (
        "expert_parallel_backend", "expert_parallel_fallback_on_unsupported", "expert_parallel_num_nvl_bytes",
        "expert_parallel_num_rdma_bytes", "expert_parallel_size", "expert_parallel_token_capacity",
    ),
}

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
    """Turn off CUDA-only features in place; return what a user-set value became.

    What cannot be adapted without changing what the job asks for (quantised loading,
    qlora, DeepSpeed/FSDP) is refused earlier, by args_check."""
    changed = []
    for flag in CUDA_ONLY_FLAGS:
        if config.get(flag) not in (None, False):
            changed.append(f"{flag}: {config[flag]!r} -> false")
        config[flag] = False
    for flag in CUDA_ONLY_WHEN_SET:
        if config.get(flag) not in (None, False):
            changed.append(f"{flag}: {config[flag]!r} -> false")
            config[flag] = False
    attention = config.get("attn_implementation")
    if attention is not None and attention not in CPU_ATTENTION_IMPLS:
        changed.append(f"attn_implementation: {attention!r} -> {CPU_ATTENTION!r}")
        config["attn_implementation"] = CPU_ATTENTION
    large_heads = config.get("large_head_attention")
    if large_heads is not None and str(large_heads).lower() != CPU_LARGE_HEAD_ATTENTION:
        changed.append(f"large_head_attention: {large_heads!r} -> {CPU_LARGE_HEAD_ATTENTION!r}")
        config["large_head_attention"] = CPU_LARGE_HEAD_ATTENTION
    changed += _drop_cuda_only_plugins(config)
    optimizer = config.get("optimizer")
    if optimizer is None or any(marker in str(optimizer) for marker in CUDA_OPTIMIZER_MARKERS):
        if optimizer is not None:
            changed.append(f"optimizer: {optimizer!r} -> {CPU_OPTIMIZER!r}")
        config["optimizer"] = CPU_OPTIMIZER
    return changed


def _drop_cuda_only_plugins(config: dict[str, Any]) -> list[str]:
    """Remove CUDA-only integrations, and the options only they read (without the plugin
    Axolotl would ignore them silently)."""
    changed = []
    kept = []
    for plugin in config.get("plugins") or []:
        options = CUDA_ONLY_PLUGIN_OPTIONS.get(integration_name(plugin) or "")
        if options is None:
            kept.append(plugin)
            continue
        removed = [key for key in options if config.pop(key, None) is not None]
        changed.append(f"plugins: {plugin} removed (needs CUDA)" + (f", with its options {', '.join(removed)}" if removed else ""))
    if changed:
        config["plugins"] = kept
    return changed


# The child processes a job runs, each `python -m <module>`; every argv is built here.
TRAIN_MODULE = "axolotl.cli.train"
MERGE_MODULE = "axolotl.cli.merge_lora"
STANDBY_MODULE = "finetune_worker.standby"
HUB_MODULE = "finetune_worker.hub"
PREFLIGHT_MODULE = "finetune_worker.preflight"
EVALUATION_MODULE = "finetune_worker.evaluation"


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


def build_preflight_argv(python: str, config_file: Path, out: Path) -> list[str]:
    return build_tool_argv(python, PREFLIGHT_MODULE, str(config_file), out=out)


def build_evaluation_argv(python: str, spec_file: Path, out: Path) -> list[str]:
    return build_tool_argv(python, EVALUATION_MODULE, str(spec_file), out=out)


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
) -> dict[str, str]:
    """The child's environment: the worker's, minus its own secrets, plus this job's
    (and the operator's step limit, which the progress plugin enforces before step 1)."""
    env = {
        key: value
        for key, value in base_env.items()
        if key not in SECRET_ENV_VARS and not key.startswith(WORKER_ONLY_ENV_PREFIXES)
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
    env.pop(STEP_LIMIT_ENV, None)
    if step_limit:
        env[STEP_LIMIT_ENV] = str(step_limit)
    env.update(other_secrets or {})
    return env


@dataclass(frozen=True)
class Speedups:
    """What the GPU worker's image offers, found by the pipeline (cheap checks, no imports)."""

    flash_attn: bool = False
    liger: bool = False
    model_type: str | None = None
    fits_without_checkpointing: bool = True


@dataclass(frozen=True)
class FastDefaults:
    """What `apply_fast_defaults` set ("key: value", for a status event), and a note for
    each default it left out because Axolotl refuses it with this config (for a warning)."""

    chosen: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
LIGER_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "granite")
ATTENTION_KEYS = ("flash_attention", "sdp_attention", "xformers_attention", "flex_attention", "sage_attention", "eager_attention", "attn_implementation")
# Models without attention layers: transformers refuses them any attn_implementation.
ATTENTION_FREE_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm")
AXOLOTL_MAMBA_CLASS = "MambaLMHeadModel"  # `model_type:` of Axolotl's own Mamba loader
# Models whose Axolotl examples leave attention unset on purpose.
UNSET_ATTENTION_MODEL_TYPES = ("gemma3n", "gemma3n_text")

# Checks a whole config (plugins registered), as the pipeline's final check does.
Validator = Callable[[dict[str, Any]], list[Any]]


@dataclass(frozen=True)
class _Default:
    key: str
    value: Any
    needs: str | None = None  # the default this one only makes sense with

    def apply(self, config: dict[str, Any]) -> None:
        if self.key == "plugins":
            config["plugins"] = [self.value, *(config.get("plugins") or [])]
        else:
            config[self.key] = self.value

    def describe(self) -> str:
        return f"plugins: + {self.value}" if self.key == "plugins" else f"{self.key}: {self.value}"


def integration_name(plugin: Any) -> str | None:
    """`liger` for axolotl.integrations.liger.LigerPlugin (or .liger.plugin.LigerPlugin)."""
    parts = str(plugin).split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["axolotl", "integrations"] else None


def _plugin_names(config: dict[str, Any]) -> set[str | None]:
    return {integration_name(p) for p in config.get("plugins") or []}


def uses_cut_cross_entropy(config: dict[str, Any]) -> bool:
    """The CCE plugin patches the loss unless `cut_cross_entropy: false` (its option defaults to on)."""
    if config.get("cut_cross_entropy"):
        return True
    return "cut_cross_entropy" in _plugin_names(config) and config.get("cut_cross_entropy") is not False


def _attention_default_applies(config: dict[str, Any], speedups: Speedups) -> bool:
    """False where the config or the model decides attention itself."""
    if any(config.get(key) for key in ATTENTION_KEYS):
        return False  # the user's choice, flex attention (which builds its own masks) included
    if config.get("gemma4_hybrid_attn_impl"):
        return False  # Axolotl picks flash attention for it, and refuses any other
    model_type = speedups.model_type or ""
    if model_type in ATTENTION_FREE_MODEL_TYPES or config.get("model_type") == AXOLOTL_MAMBA_CLASS:
        return False
    if not speedups.model_type and "mamba" in str(config.get("base_model", "")).lower():
        return False  # Axolotl's loader treats a config-less "mamba" repo as Mamba
    return model_type not in UNSET_ATTENTION_MODEL_TYPES


def _candidate_defaults(config: dict[str, Any], hardware: Hardware, speedups: Speedups) -> list[_Default]:
    """The defaults for `config`, each guarded by what it must not clash with, in order."""
    work = copy.deepcopy(config)
    chosen: list[_Default] = []

    def default(key: str, value: Any, needs: str | None = None, force: bool = False) -> None:
        if force or work.get(key) is None:
            chosen.append(_Default(key, value, needs))
            chosen[-1].apply(work)

    def ours(key: str) -> str | None:
        return key if any(d.key == key for d in chosen) else None

    if _attention_default_applies(work, speedups):
        default("attn_implementation", "flash_attention_2" if speedups.flash_attn else "sdpa")
    # Axolotl keeps packed samples from attending to each other only with flash attention.
    packs_cleanly = work.get("attn_implementation") == "flash_attention_2" or bool(work.get("flash_attention"))
    if packs_cleanly and not work.get("rl") and not work.get("pretraining_dataset"):
        default("sample_packing", True, needs=ours("attn_implementation"))
        if work.get("sample_packing"):
            default("pad_to_sequence_len", True, needs=ours("sample_packing"))
    if work.get("bf16") in (None, "auto") and work.get("fp16") is None:
        default("bf16", bool(hardware.bf16), force=True)
        if not hardware.bf16:
            default("fp16", True)
    if speedups.liger and speedups.model_type in LIGER_MODEL_TYPES and "liger" not in _plugin_names(work):
        tensor_parallel = (work.get("tensor_parallel_size") or 1) > 1
        own_mlp = work.get("tiled_mlp") and not work.get("tiled_mlp_use_original_mlp")
        other_loss = uses_cut_cross_entropy(work) or work.get("chunked_cross_entropy")
        default("plugins", LIGER_PLUGIN, force=True)
        default("liger_rope", True, needs="plugins")
        if not tensor_parallel:  # Liger's RMSNorm and its losses do not support tensor parallelism
            default("liger_rms_norm", True, needs="plugins")
        if not own_mlp:  # tiled MLP replaces the MLP Liger's GLU kernel would patch
            default("liger_glu_activation", True, needs="plugins")
        if not (tensor_parallel or other_loss):  # one fused cross-entropy at a time
            default("liger_fused_linear_cross_entropy", True, needs="plugins")
    if not speedups.fits_without_checkpointing:
        default("gradient_checkpointing", True)
    default("save_total_limit", 2)
    return chosen


def _with(config: dict[str, Any], defaults: list[_Default]) -> dict[str, Any]:
    result = copy.deepcopy(config)
    for d in defaults:
        d.apply(result)
    return result


def _accepted_defaults(config: dict[str, Any], defaults: list[_Default], validate: Validator) -> tuple[list[_Default], list[str]]:
    """Add the defaults one by one, keeping each one Axolotl accepts (no problem the
    config did not have already); a left-out default takes the ones that need it along."""
    already = {str(p) for p in validate(config)}
    kept: list[_Default] = []
    left_out: dict[str, tuple[str, list[str]]] = {}
    for d in defaults:
        if d.needs in left_out:
            left_out[d.needs][1].append(d.describe())
            continue
        new = [str(p) for p in validate(_with(config, [*kept, d])) if str(p) not in already]
        if new:
            left_out[d.key] = (f"fast default {d.describe()} left out: Axolotl refuses it with this config ({new[0]})", [])
        else:
            kept.append(d)
    notes = [note + (f"; so are {', '.join(along)}" if along else "") for note, along in left_out.values()]
    return kept, notes


def apply_fast_defaults(config: dict[str, Any], hardware: Hardware, speedups: Speedups, validate: Validator | None = None) -> FastDefaults:
    """On a GPU, what experienced Axolotl users set for speed, where the job left it unset.

    A default never changes what the config asks for: each applies only where it is
    compatible with the rest of the config, and with `validate` (Axolotl's check of the
    whole config) a default Axolotl would refuse is left out, with a note, instead of
    failing the job. Changes `config` in place.
    """
    if not hardware.has_gpu:
        return FastDefaults()
    defaults = _candidate_defaults(config, hardware, speedups)
    dropped: list[str] = []
    if validate is not None and defaults and validate(_with(config, defaults)):
        defaults, dropped = _accepted_defaults(config, defaults, validate)
    for d in defaults:
        d.apply(config)
    return FastDefaults(chosen=[d.describe() for d in defaults], dropped=dropped)


# The plan after build_axolotl_config: each later fact is an input to a pure function
# that returns a new plan (the config dicts are never shared between two plans).


def with_fast_defaults(plan: AxolotlPlan, hardware: Hardware, speedups: Speedups, validate: Validator | None = None) -> tuple[AxolotlPlan, FastDefaults]:
    config = copy.deepcopy(plan.config)
    fast = apply_fast_defaults(config, hardware, speedups, validate)
    return replace(plan, config=config), fast


def with_config(plan: AxolotlPlan, **changes: Any) -> AxolotlPlan:
    """A new plan whose config has these keys set (a value of None removes the key)."""
    config = copy.deepcopy(plan.config)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return replace(plan, config=config)


def with_prepared_data(plan: AxolotlPlan, fingerprint: str) -> AxolotlPlan:
    """Axolotl's prepared-data cache, keyed by the datasets' content and the tokenizing options."""
    return with_config(plan, dataset_prepared_path=str(Path(plan.config["dataset_prepared_path"]) / fingerprint))


def with_resume_point(plan: AxolotlPlan, checkpoint: Path | None) -> AxolotlPlan:
    return plan if checkpoint is None else with_config(plan, resume_from_checkpoint=str(checkpoint))


def with_repo_id(plan: AxolotlPlan, repo_id: str) -> AxolotlPlan:
    return replace(plan, publish={**plan.publish, "hub_model_id": repo_id})
