"""The estimate table: for each GPU type and count, fits or not, training time, wall time and cost.

Each row costs the config as the worker would plan it on that GPU type (its fast defaults,
judged on a synthetic `Hardware` of the type), from the preflight's token counts and the
base model's config.json; nothing is loaded. The arithmetic is in `throughput.py`, the
published runs behind it in `throughput_sources.py`, the GPU types and prices in `gpus.py`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

from finetune_worker.checks.distributed import deepspeed_stage
from finetune_worker.host.hardware import Hardware
from finetune_worker.plan.fast_defaults import Speedups, apply_fast_defaults
from finetune_worker.sizing.capacity import with_headroom
from finetune_worker.sizing.gpus import BY_NAME, COUNTS, GIB, Gpu, price_note
from finetune_worker.sizing.measured import Learned
from finetune_worker.sizing.memory import estimate_gpu_memory, suggestions
from finetune_worker.sizing.resources import lora_params
from finetune_worker.sizing.throughput import (
    ONLINE_RL,
    REFERENCE_MODEL_RL,
    Evaluation,
    Fixed,
    Lengths,
    Rates,
    cheapest,
    comparison_seconds,
    dequantisation_seconds,
    fastest,
    fixed_phases,
    flops_per_token,
    method_of,
    model_shape,
    schedule,
    train_seconds,
    training_eval_seconds,
    utilisation,
)

KNOWN_ERROR = "time +-40% (utilisation from published runs, not this endpoint's), memory 0.75-1.33x; worker start not included"


@dataclass(frozen=True)
class Request:
    """What the table is computed from."""

    config: dict  # the planned Axolotl config, for a GPU, before any GPU's fast defaults
    model_config: dict  # the base model's config.json
    lengths: Lengths
    fixed: Fixed = Fixed()
    evaluation: Evaluation = Evaluation()
    gpus: tuple[Gpu, ...] = ()
    prices: dict[str, float | None] = field(default_factory=dict)
    price_overrides: dict[str, float] = field(default_factory=dict)
    rates: Rates = Rates()
    counts: tuple[int, ...] = COUNTS
    kernels: Speedups = Speedups(flash_attn=True, liger=True)  # what the worker's GPU image ships
    learned: dict[str, Learned] = field(default_factory=dict)  # GPU type -> what this endpoint's earlier runs measured there


def gpu_hardware(gpu: Gpu, count: int) -> Hardware:
    """A machine with `count` GPUs of this type, for the rules and defaults that read the hardware."""
    return Hardware(gpu_count=count, gpu_names=(gpu.name,) * count, gpu_memory_bytes=(gpu.usable_memory_bytes,) * count,
                    bf16=gpu.compute_capability >= (8, 0), compute_capability=gpu.compute_capability, cpu_count=16)


ESTIMATE_GPU = "NVIDIA H100 80GB HBM3"
# The machine `mode: estimate` judges a job for (its rules, the GPU's defaults), on any worker.
ESTIMATE_HARDWARE = gpu_hardware(BY_NAME[ESTIMATE_GPU], 8)


def planned_for(config: dict, model_config: dict, gpu: Gpu, count: int, kernels: Speedups) -> dict:
    """The config with the fast defaults the worker would add on this GPU type."""
    hardware = gpu_hardware(gpu, count)
    found = with_headroom(replace(kernels, model_type=model_config.get("model_type")), config, model_config, hardware, count)
    planned = copy.deepcopy(config)
    apply_fast_defaults(planned, hardware, found)
    return planned


def significant(seconds: float) -> float:
    """Tenths of a second, or four significant digits below 100 s: a tiny model's training is a
    fraction of a second, never 0."""
    return round(seconds, 1) if seconds >= 100 else float(f"{seconds:.4g}")


def earlier_runs(runs: int, gpu: Gpu) -> str:
    return f"{runs} earlier run{'s' if runs != 1 else ''} on {gpu.short}"


def estimate_row(request: Request, gpu: Gpu, count: int) -> dict:
    config = planned_for(request.config, request.model_config, gpu, count, request.kernels)
    memory = estimate_gpu_memory(config, request.model_config, count).total
    known = request.learned.get(gpu.name)
    if known is not None and known.memory_ratio is not None:
        memory *= known.memory_ratio  # this endpoint's measured peaks over the estimate, for this family, method and type
    price = request.prices.get(gpu.name)
    row: dict = {"gpu": gpu.name, "count": count, "fits": memory <= gpu.usable_memory_bytes, "memory_gib": round(memory / GIB, 1),
                 "train_seconds": None, "total_seconds": None, "cost_usd": None,
                 "price_per_gpu_hour": price, "gradient_checkpointing": bool(config.get("gradient_checkpointing")),
                 "sample_packing": bool(config.get("sample_packing"))}
    if known is not None and known.memory_ratio is not None:
        row["memory_from"] = earlier_runs(known.memory_runs, gpu)
    if not gpu.offered:
        row["note"] = "not offered by RunPod"
    if not row["fits"]:
        row["reason"] = (f"needs about {memory / GIB:.1f} GiB per GPU, the GPU has {gpu.usable_memory_bytes / GIB:.1f} GiB; "
                         f"try {suggestions(config, count)}")
        return row
    rl = str(config.get("rl") or "").lower()
    if rl in ONLINE_RL:
        row["reason"] = "generation time is not modelled (online RL)"
        return row
    method = method_of(config)
    shape = model_shape(request.model_config)
    lora = lora_params(config, request.model_config, shape.matmul_params) if method != "full" else 0
    checkpointing = bool(config.get("gradient_checkpointing"))
    work = flops_per_token(shape, method, lora, request.lengths.token_weighted_length, checkpointing, rl in REFERENCE_MODEL_RL)
    plan = schedule(request.lengths, config, count)
    hfu, _ = utilisation(gpu, method)
    measured = known is not None and known.hardware_utilisation is not None
    if measured:
        hfu = known.hardware_utilisation
    sharded = bool(config.get("fsdp_config") or config.get("fsdp")) or deepspeed_stage(config.get("deepspeed")) == 3
    seconds = train_seconds(plan, work, gpu, count, hfu, sharded)
    if method == "qlora":
        seconds += dequantisation_seconds(shape, gpu, plan.steps * int(config.get("gradient_accumulation_steps") or 1), checkpointing)
    evaluate = (training_eval_seconds(request.evaluation, config, shape, plan, gpu, count, hfu, sharded)
                + comparison_seconds(request.evaluation, shape, gpu, request.fixed, request.rates))
    phases = {**fixed_phases(request.fixed, method, request.rates), "evaluate": round(evaluate, 1), "train": significant(seconds)}
    total = sum(phases.values())
    row.update(train_seconds=significant(seconds), total_seconds=round(total, 1), phases_seconds=phases, steps=plan.steps,
               processed_tokens=plan.processed_tokens, utilisation=hfu)
    row["from"] = earlier_runs(known.runs, gpu) if measured else "table"
    row["tokens_per_second"] = round(plan.processed_tokens / seconds, 1) if seconds else None
    if price is not None:
        row["cost_usd"] = round(total * count * price / 3600, 2)
    return row


def estimate_table(request: Request) -> dict:
    """The answer of `mode: estimate` (and the preflight's `estimate`)."""
    shape = model_shape(request.model_config)
    rows = [estimate_row(request, gpu, count) for gpu in request.gpus for count in request.counts]
    one = schedule(request.lengths, {**request.config, "sample_packing": False}, 1)
    learned = {gpu: request.learned[gpu.name] for gpu in request.gpus if gpu.name in request.learned}
    sources = sorted({utilisation(gpu, method_of(request.config))[1] for gpu in request.gpus
                      if gpu not in learned or learned[gpu].hardware_utilisation is None})
    sources += [f"utilisation on {gpu.short}: {known.hardware_utilisation:.3f}, measured by this endpoint on "
                f"{known.runs} earlier run(s) of this model family and method" for gpu, known in learned.items() if known.hardware_utilisation is not None]
    sources += [f"memory on {gpu.short}: the estimate x {known.memory_ratio:.3f}, the peak this endpoint measured over the estimate on "
                f"{known.memory_runs} earlier run(s) of this model family and method" for gpu, known in learned.items() if known.memory_ratio is not None]
    sources += [price_note(request.price_overrides), f"known error: {KNOWN_ERROR}",
                "method and sources: docs/operating.md#estimates-time-and-cost-before-training"]
    found = {
        "train_tokens": one.train_tokens,
        "epochs": round(one.epochs, 3),
        "method": method_of(request.config),
        "params": shape.matmul_params,
        "active_params": shape.active_params,
        "rows": rows,
        "cheapest": cheapest(rows),
        "fastest": fastest(rows),
        "sources": sources,
    }
    if found["fastest"] is None:
        found["reason"] = "no GPU type and count fits this config" if not any(r["fits"] for r in rows) else "no row has a time"
    return found
