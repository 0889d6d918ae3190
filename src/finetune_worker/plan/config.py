"""Pure translation: the checked job -> the Axolotl config, and a new plan for each later fact.

Nothing here reads globals, files or the environment: every input is an argument.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from finetune_worker.checks.axolotl_schema import integration_name
from finetune_worker.checks.continue_from import Origin
from finetune_worker.checks.options import AXOLOTL_KEPT_CHECKPOINTS, INLINE_DATASET_KEYS
from finetune_worker.host.hardware import Hardware
from finetune_worker.host.rundir import RunPaths

PROGRESS_PLUGIN = "finetune_worker.run.progress_plugin.ProgressPlugin"

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
    "cut_cross_entropy": ("cut_cross_entropy", "cut_cross_entropy_accum_c_fp32", "cut_cross_entropy_c_grad_chunk_size"),
    "liger": (
        "liger_cross_entropy", "liger_fused_linear_cross_entropy", "liger_glu_activation", "liger_kernel_impl", "liger_layer_norm",
        "liger_rms_norm", "liger_rms_norm_gated", "liger_rope", "liger_swiglu", "liger_use_token_scaling",
    ),
    "kernels": (
        "autotune_cache_path", "autotune_neighborhood", "autotune_profiles", "dsv4_bf16_all", "dsv4_fp4_grouped_mode",
        "dsv4_fp8_lora_kernel", "dsv4_fp8_nonexpert_mode", "dsv4_shared_mlp_lora_kernel", "expert_backend", "gemma4_fp8_nonexpert",
        "gemma4_nf4_nonexpert", "moe_bnb_fast", "moe_dequant_chunk_size", "moe_grouped_backend", "nonexpert_quantization",
        "nvfp4_merge_aware_start_step", "use_dsv4_kernels", "use_glm_dsa_kernels", "use_scattermoe", "use_sonicmoe",
    ),
    # Built into Axolotl 0.21 (registered for every run), so its options are always known.
    "expert_parallel": (
        "expert_parallel_backend", "expert_parallel_dispatch_chunks", "expert_parallel_fallback_on_unsupported",
        "expert_parallel_num_nvl_bytes", "expert_parallel_num_rdma_bytes", "expert_parallel_save_dispatch", "expert_parallel_size",
        "expert_parallel_token_capacity",
    ),
}

@dataclass(frozen=True)
class DataSource:
    """A dataset the worker writes into the run directory before Axolotl reads it."""

    where: str  # "args.datasets[0]"
    dest: Path
    rows: list | None = None
    url: str | None = None
    bucket_uri: str | None = None  # s3://...: fetched by the storage child with the job's storage keys (run/storage.py)


@dataclass(frozen=True)
class AxolotlPlan:
    config: dict[str, Any]
    warnings: list[str]
    publish: dict[str, Any]
    adapted_for_cpu: list[str]
    data_sources: list[DataSource] = field(default_factory=list)


@dataclass(frozen=True)
class Tracking:
    """W&B is on when the job or the worker has a key (and may use it: checks/tenancy.py);
    TensorBoard always. A shared endpoint's key forces its entity and the user's project."""

    wandb_key: bool = False
    model_id: str = ""
    run_id: str = ""
    wandb_entity: str | None = None
    wandb_project: str | None = None
    wandb_off_reason: str = "no wandb_api_key in the job or the worker's environment"


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
    place_export(config, paths, tracking.model_id)
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


def place_export(config: dict[str, Any], paths: RunPaths, model_id: str) -> None:
    """`export.outfile` (a plain file name, checked before; else `<model_id>-{ftype}.gguf`)
    put in the run's gguf folder, in place."""
    export = config.get("export")
    if isinstance(export, dict):
        name = Path(str(export.get("outfile") or f"{model_id or 'model'}-{{ftype}}.gguf")).name
        config["export"] = {**export, "outfile": str(paths.gguf_dir / name)}


KNOWN_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt")


def localise_datasets(config: dict[str, Any], data_dir: Path) -> list[DataSource]:
    """Point inline-rows, https and s3 datasets at files in the run directory (in place)."""
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
            elif str(entry.get("path", "")).startswith("s3://"):  # read with the job's storage keys, never by Axolotl
                suffix = Path(entry["path"]).suffix.lower()
                dest = data_dir / f"{key}-{index}{suffix if suffix in KNOWN_DATA_SUFFIXES else ''}"
                sources.append(DataSource(where, dest, bucket_uri=entry["path"]))
                entry["path"] = str(dest)
    return sources


WANDB_KEYS = ("wandb_project", "wandb_entity", "wandb_name", "wandb_run_id", "wandb_watch", "wandb_log_model", "wandb_mode")


def apply_tracking(config: dict[str, Any], tracking: Tracking) -> list[str]:
    """TensorBoard logs by default; W&B only with a key (project defaults to the model id)."""
    config.setdefault("use_tensorboard", True)
    if tracking.wandb_key:
        config.update({key: value for key, value in (("wandb_entity", tracking.wandb_entity), ("wandb_project", tracking.wandb_project)) if value})
        config.setdefault("wandb_project", tracking.model_id)
        config.setdefault("wandb_name", tracking.run_id)
        return []
    dropped = [key for key in WANDB_KEYS if config.pop(key, None) is not None]
    if dropped:
        return [f"W&B is off: {tracking.wandb_off_reason}, so {', '.join(dropped)} was ignored"]
    return []


def adapt_for_cpu(config: dict[str, Any]) -> list[str]:
    """Turn off CUDA-only features in place; return what a user-set value became.

    What cannot be adapted without changing what the job asks for (quantised loading,
    qlora, DeepSpeed/FSDP, low-precision QAT, context parallelism) is refused earlier, by
    args_check."""
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


# What an estimate's preflight on a CPU worker leaves out: tokenizing does not depend on them.
GPU_ONLY_FOR_TOKENIZING = ("load_in_4bit", "load_in_8bit", "gptq", "deepspeed", "fsdp", "fsdp_config", "fsdp_version",
                           "context_parallel_size", "sequence_parallel_degree", "qat")


def for_tokenizing_on_cpu(config: dict[str, Any]) -> list[str]:
    """`mode: estimate` on a CPU worker: the job is judged for GPUs, but its preflight
    tokenizes here, so what only a GPU runs (quantised loading, QLoRA, sharding) is taken out
    of the copy the preflight child reads (in place; what changed)."""
    changed = [f"{key}: removed" for key in GPU_ONLY_FOR_TOKENIZING if config.pop(key, None) not in (None, False)]
    if config.get("adapter") == "qlora":
        config["adapter"] = "lora"
        changed.append("adapter: 'qlora' -> 'lora'")
    return changed


def with_tokenizing_copy(plan: AxolotlPlan) -> AxolotlPlan:
    config = copy.deepcopy(plan.config)
    changed = for_tokenizing_on_cpu(config)
    note = ["estimating for GPUs on a worker without one: the preflight tokenizes a copy without " + "; ".join(changed)] if changed else []
    return replace(plan, config=config, warnings=[*plan.warnings, *note])


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


# The plan after build_axolotl_config: each later fact is an input to a pure function
# that returns a new plan (the config dicts are never shared between two plans).


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


def with_continue_from(plan: AxolotlPlan, origin: Origin | None) -> AxolotlPlan:
    """Start from an earlier run (checks/continue_from.Origin): its adapter becomes the
    starting adapter (lora_model_dir), or its weights the base model."""
    if origin is None:
        return plan
    if origin.starts_as == "adapter":
        return with_config(plan, lora_model_dir=str(origin.path))
    return with_config(plan, base_model=str(origin.path), tokenizer_config=origin.tokenizer or plan.config.get("tokenizer_config"))


def with_checkpoint_cap(plan: AxolotlPlan, cap: int | None) -> AxolotlPlan:
    """At most `cap` checkpoints kept (the operator's FINETUNE_MAX_CHECKPOINTS): a
    save_total_limit the job left unset (Axolotl keeps 4) or a fast default above it is lowered."""
    kept = plan.config.get("save_total_limit") or AXOLOTL_KEPT_CHECKPOINTS
    if cap is None or not isinstance(kept, int) or kept <= cap:
        return plan
    capped = with_config(plan, save_total_limit=cap)
    return replace(capped, warnings=[*plan.warnings, f"save_total_limit: {cap} (this worker keeps at most {cap} checkpoints per run, "
                                                     "FINETUNE_MAX_CHECKPOINTS; the oldest ones are deleted as new ones are saved)"])


def with_repo_id(plan: AxolotlPlan, repo_id: str) -> AxolotlPlan:
    return replace(plan, publish={**plan.publish, "hub_model_id": repo_id})
