"""Will the run fit? The GPU memory and disk checks, and what the GPU offers for speed.

All three read the planned config and the base model's facts (its config.json and
size, from `resources.model_facts`); none loads a model.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
from dataclasses import replace

from finetune_worker.contract import errors, events
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import WorkerSettings
from finetune_worker.host.hardware import Hardware
from finetune_worker.plan.fast_defaults import Speedups, apply_fast_defaults
from finetune_worker.sizing.memory import CLEARLY_OVER, estimate_gpu_memory, suggestions
from finetune_worker.sizing.resources import ModelFacts, estimate_disk, gib

FITS_FRACTION = 0.9  # without gradient checkpointing, the estimate must stay under this share of the GPU


def speedups(config: dict, model_config: dict | None, hardware: Hardware, processes: int) -> Speedups:
    """What this GPU worker can use for speed: installed kernels, the model type, memory
    headroom. The headroom is judged on the config as the other fast defaults will leave
    it (bf16, packing, Liger's fused cross-entropy, which takes the logits term away)."""
    if not hardware.has_gpu:
        return Speedups()
    model_config = model_config or {}
    found = Speedups(
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
        liger=importlib.util.find_spec("liger_kernel") is not None,
        model_type=model_config.get("model_type"),
    )
    return with_headroom(found, config, model_config, hardware, processes)


def with_headroom(found: Speedups, config: dict, model_config: dict, hardware: Hardware, processes: int) -> Speedups:
    """Whether the config fits this hardware without gradient checkpointing, judged as the
    other fast defaults will leave it (unknown without the model's shape: assumed to fit)."""
    if "hidden_size" not in model_config or not hardware.gpu_memory_bytes:
        return found
    planned = copy.deepcopy(config)
    apply_fast_defaults(planned, hardware, found)
    plain = estimate_gpu_memory({**planned, "gradient_checkpointing": False}, model_config, processes)
    return replace(found, fits_without_checkpointing=plain.total <= FITS_FRACTION * min(hardware.gpu_memory_bytes))


def check_memory(config: dict, model_config: dict | None, hardware: Hardware, processes: int, shape: str | None = None) -> list[dict]:
    """Peak GPU memory per GPU against the smallest GPU present; fail when it clearly cannot fit.
    `processes`: every training process (on a cluster, of every node: ZeRO-3 and FSDP shard
    over all of them); `shape`: the cluster's, said in the status."""
    if not hardware.has_gpu:
        return []
    if not model_config or "hidden_size" not in model_config:
        return [events.status("preparing", "no memory estimate: the base model's config is not on the volume yet")]
    estimate = estimate_gpu_memory(config, model_config, processes)
    capacity = min(hardware.gpu_memory_bytes)
    if estimate.total > capacity * CLEARLY_OVER:
        raise JobError(
            errors.OUT_OF_MEMORY,
            f"this config needs about {estimate.describe()}, but each GPU has {gib(capacity)}; "
            f"it will not fit. Try {suggestions(config, processes)}",
        )
    return [events.status(
        "preparing", f"estimated peak GPU memory: {estimate.describe()} of {gib(capacity)} per GPU" + (f" on {shape}" if shape else ""),
        memory_estimate_bytes=estimate.total, memory_parts_bytes=estimate.parts, gpu_memory_bytes=capacity,
    )]


def check_disk(config: dict, base: ModelFacts, settings: WorkerSettings, merge: bool = False) -> None:
    """The run's estimated writes against the volume's free space, and what it keeps in its
    run directory against the operator's FINETUNE_MAX_RUN_BYTES (also checked at each checkpoint)."""
    estimate = estimate_disk(config, base, merge)
    if estimate is None:
        return
    free = shutil.disk_usage(settings.base_volume).free
    if estimate.total > free:
        raise JobError(
            errors.DISK_FULL,
            f"this run will write {estimate.describe()}, but the volume has {gib(free)} free; "
            "free space, lower save_total_limit, or use a larger volume",
        )
    if settings.max_run_bytes is not None and estimate.in_run_dir > settings.max_run_bytes:
        raise JobError(
            errors.DISK_QUOTA,
            f"this run will keep about {gib(estimate.in_run_dir)} in its run directory ({estimate.describe()}), over this worker's "
            f"limit of {gib(settings.max_run_bytes)} per run (FINETUNE_MAX_RUN_BYTES); keep fewer checkpoints (save_total_limit)"
            + (", or merge the LoRA elsewhere" if merge else ""),
        )
