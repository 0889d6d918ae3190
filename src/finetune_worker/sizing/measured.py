"""What a training measured (tokens per second, the utilisation it reached, peak GPU memory,
the wall time of each phase), and the endpoint's store of those measurements, which the
next estimate for the same model family, method and GPU type uses instead of the table.

The store is one JSON Lines file on the volume (`<BASE_VOLUME>/cache/measurements.jsonl`),
one record per training that ran on a GPU type the table knows; a CPU run records nothing
(it says nothing about GPUs). Each record keeps the hardware utilisation reached and the
peak memory over the memory estimate for the config that ran: the next estimate uses the
median of each (time: that utilisation instead of the table's; memory: the estimate times
that ratio).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from finetune_worker.host.hardware import Hardware
from finetune_worker.sizing import gpus
from finetune_worker.sizing.memory import estimate_gpu_memory
from finetune_worker.sizing.resources import lora_params
from finetune_worker.sizing.throughput import flops_per_token, method_of, model_shape

STORE_NAME = "measurements.jsonl"
MEMORY_RATIO_RANGE = (0.25, 4.0)  # a ratio outside it says the record is wrong, not the estimate
FROM_METRICS = (("train_seconds", "train_runtime"), ("tokens", "num_input_tokens_seen"), ("tokens_per_second", "train_tokens_per_second"),
                ("peak_memory_reserved", "peak_memory_reserved"), ("peak_memory_allocated", "peak_memory_allocated"))


def utilisation(tokens_per_second: float, config: dict, model_config: dict, gpu: gpus.Gpu, count: int) -> tuple[float, float]:
    """(MFU, HFU): the model's FLOPs per second over the GPUs' dense BF16 peak, without and with
    gradient checkpointing's recomputation; attention counted at sequence_len."""
    shape = model_shape(model_config)
    method = method_of(config)
    lora = lora_params(config, model_config, shape.matmul_params) if method != "full" else 0
    work = flops_per_token(shape, method, lora, float(config.get("sequence_len") or 512), bool(config.get("gradient_checkpointing")))
    peak = gpu.peak_flops * count
    return round(tokens_per_second * work.model / peak, 4), round(tokens_per_second * work.hardware / peak, 4)


def training_measured(metrics: dict, phases: dict, config: dict, model_config: dict | None, hardware: Hardware, processes: int) -> dict:
    """The training's own figures; the GPU-only ones (memory, utilisation) are absent on a CPU, never 0."""
    found: dict = {name: metrics[key] for name, key in FROM_METRICS if isinstance(metrics.get(key), (int, float))}
    if isinstance(metrics.get("peak_memory_per_rank"), list):  # several processes on GPUs
        found["peak_memory_per_rank"] = metrics["peak_memory_per_rank"]
    found["phases_seconds"] = dict(phases)
    gpu = gpus.gpu_for(hardware.gpu_names[0]) if hardware.has_gpu else None
    speed = found.get("tokens_per_second")
    if gpu is not None and speed and model_config and "hidden_size" in model_config:
        found["utilisation"], found["hardware_utilisation"] = utilisation(speed, config, model_config, gpu, processes)
        found.update(gpu=gpu.name, count=processes)
    return found


def memory_ratio(measured: dict, config: dict, model_config: dict) -> float | None:
    """The peak memory a GPU run reserved (the largest rank's) over the estimate for the config that ran."""
    peak, count = measured.get("peak_memory_reserved"), measured.get("count") or 1
    if not isinstance(peak, int) or peak <= 0 or "hidden_size" not in model_config:
        return None
    estimate = estimate_gpu_memory(config, model_config, count).total
    return round(peak / estimate, 4) if estimate > 0 else None


def record(store: Path, measured: dict, config: dict, model_config: dict | None) -> bool:
    """Keep a GPU run's measurement for later estimates (True when one was kept)."""
    if "hardware_utilisation" not in measured or not model_config:
        return False
    entry = {"time": time.time(), "model_type": model_config.get("model_type"), "method": method_of(config), "gpu": measured["gpu"],
             "count": measured["count"], "hardware_utilisation": measured["hardware_utilisation"],
             "tokens_per_second": measured["tokens_per_second"], "peak_memory_reserved": measured.get("peak_memory_reserved"),
             "memory_ratio": memory_ratio(measured, config, model_config)}
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
    return True


@dataclass(frozen=True)
class Learned:
    """What this endpoint's earlier runs of one model family and method measured on one GPU type."""

    hardware_utilisation: float | None  # the median; None when no run recorded one
    runs: int
    memory_ratio: float | None = None  # the median of peak memory over the estimate
    memory_runs: int = 0


def _number(entry: dict, name: str) -> float | None:
    value = entry.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def learned(store: Path, model_type: str | None, method: str) -> dict[str, Learned]:
    """GPU type -> what this endpoint's earlier runs of this model family and method measured
    there (medians, and how many runs), from the store; {} without any."""
    speeds: dict[str, list[float]] = {}
    memory: dict[str, list[float]] = {}
    try:
        lines = store.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a torn last line of a worker that died while writing
        if not isinstance(entry, dict) or entry.get("model_type") != model_type or entry.get("method") != method:
            continue
        gpu = str(entry.get("gpu"))
        if (hfu := _number(entry, "hardware_utilisation")) is not None:
            speeds.setdefault(gpu, []).append(hfu)
        ratio = _number(entry, "memory_ratio")
        if ratio is not None and MEMORY_RATIO_RANGE[0] <= ratio <= MEMORY_RATIO_RANGE[1]:
            memory.setdefault(gpu, []).append(ratio)
    found = {}
    for gpu in speeds.keys() | memory.keys():
        hfu, ratios = speeds.get(gpu, []), memory.get(gpu, [])
        found[gpu] = Learned(round(statistics.median(hfu), 4) if hfu else None, len(hfu),
                             round(statistics.median(ratios), 4) if ratios else None, len(ratios))
    return found
