"""How big the model is, and how much disk a run will write, before it starts.

The estimate (documented in docs/operating.md, "Disk check"):

  total = download + kept_checkpoints x checkpoint + final (+ merged), plus 10%
  download   = weight bytes of the base model, when it is not local or cached
  checkpoint = full fine-tune: weights + Adam's two fp32 states (8 bytes/param)
               LoRA: adapter params x 4 bytes x 3 (weights + two Adam states)
  final      = weights (full) or adapter (LoRA)
  kept       = the saves the config asks for, at most save_total_limit (unset: Axolotl's 4)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_worker.checks.options import AXOLOTL_KEPT_CHECKPOINTS
from finetune_worker.contract.job import LORA_ADAPTERS

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
BYTES_PER_DTYPE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}
LORA_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MARGIN = 1.10


@dataclass(frozen=True)
class ModelFacts:
    weight_bytes: int | None
    needs_download: bool
    config: dict | None  # the model's config.json, when it is on disk

    @property
    def bytes_per_param(self) -> int:
        dtype = (self.config or {}).get("torch_dtype") or (self.config or {}).get("dtype") or "bfloat16"
        return BYTES_PER_DTYPE.get(str(dtype), 2)

    @property
    def params(self) -> int | None:
        return self.weight_bytes // self.bytes_per_param if self.weight_bytes else None


def weights_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _index(directory: Path) -> dict | None:
    for name in INDEX_FILES:
        index = _read_json(directory / name)
        if index is not None:
            return index
    return None


def _cache_folder(hub_id: str) -> str:
    """The folder huggingface_hub keeps a model repo in, inside the Hub cache."""
    from huggingface_hub.file_download import repo_folder_name

    return repo_folder_name(repo_id=hub_id, repo_type="model")


def _cached_snapshot(hub_id: str, hub_cache: Path) -> Path | None:
    cache = hub_cache / _cache_folder(hub_id) / "snapshots"
    snapshots = sorted(cache.glob("*"), key=lambda p: p.stat().st_mtime) if cache.is_dir() else []
    return snapshots[-1] if snapshots else None


def download_ended(hub_id: str, hub_cache: Path, since: float) -> float | None:
    """When the model's download that began at `since` (a time.time()) ended: the newest file
    it put in the Hub cache (huggingface_hub writes each one aside and renames it into
    `blobs/` once whole). None when nothing arrived: the model was cached, or is local."""
    blobs = hub_cache / _cache_folder(hub_id) / "blobs"
    arrived = [entry.stat().st_mtime for entry in blobs.iterdir() if entry.is_file()] if blobs.is_dir() else []
    return max((when for when in arrived if when >= since), default=None)


def directory_facts(directory: Path, local: bool = False) -> ModelFacts:
    """Facts from one model directory: a local model, or a Hub cache snapshot.

    A snapshot may hold only config.json and the weights' index (fetched before the
    download, `python -m finetune_worker.publish.hub model-config`): its weights are still to
    be downloaded, and their size is the index's metadata.total_size. A local model
    is never downloaded."""
    config = _read_json(directory / "config.json")
    on_disk = weights_size(directory)
    index = _index(directory)
    if index is not None:
        shards = set((index.get("weight_map") or {}).values())
        complete = bool(shards) and all((directory / shard).is_file() for shard in shards)
        total = (index.get("metadata") or {}).get("total_size")
        size = int(total) if isinstance(total, (int, float)) and total > 0 else (on_disk or None)
        return ModelFacts(weight_bytes=size, needs_download=not (local or complete), config=config)
    return ModelFacts(weight_bytes=on_disk or None, needs_download=not local and on_disk == 0, config=config)


def model_facts(base_model: str, hub_cache: Path) -> ModelFacts:
    """Size and config of the base model, from disk only (a local dir or the Hub cache)."""
    local = Path(base_model)
    if local.is_absolute() and local.is_dir():
        return directory_facts(local, local=True)
    directory = _cached_snapshot(base_model, hub_cache)
    if directory is None:
        return ModelFacts(weight_bytes=None, needs_download=True, config=None)
    return directory_facts(directory)


def linear_shapes(model_config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer in one decoder layer of a Llama-shaped model."""
    hidden = model_config["hidden_size"]
    inter = model_config.get("intermediate_size", 4 * hidden)
    heads = model_config.get("num_attention_heads", 1)
    # head_dim when the config sets it (Gemma: 256, wider than hidden / heads), else hidden / heads
    head_dim = model_config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, model_config.get("num_key_value_heads", heads) * head_dim
    return {
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }


MOE_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def linear_params(model_config: dict) -> tuple[int, int]:
    """(all, active per token) parameters of the decoder's linear layers, over every layer.

    A dense model uses all of them for every token. A mixture of experts keeps every expert
    (memory) but runs only num_experts_per_tok of them per token (FLOPs), plus its shared
    experts, its router, and the dense layers before first_k_dense_replace."""
    shapes = linear_shapes(model_config)
    hidden, layers = model_config["hidden_size"], model_config["num_hidden_layers"]
    dense = sum(fan_in * fan_out for fan_in, fan_out in shapes.values())
    experts = next((int(model_config[key]) for key in MOE_EXPERT_KEYS if model_config.get(key)), 0)
    if experts <= 1:
        return layers * dense, layers * dense
    attention = sum(fan_in * fan_out for name, (fan_in, fan_out) in shapes.items() if name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    expert = 3 * hidden * int(model_config.get("moe_intermediate_size") or model_config.get("intermediate_size") or 4 * hidden)
    shared = int(model_config.get("n_shared_experts") or 0) * expert
    shared += 3 * hidden * int(model_config.get("shared_expert_intermediate_size") or 0)
    top_k = int(model_config.get("num_experts_per_tok") or 1)
    router = hidden * experts
    dense_layers = min(int(model_config.get("first_k_dense_replace") or 0), layers)
    moe_layers = layers - dense_layers
    every = dense_layers * dense + moe_layers * (attention + router + experts * expert + shared)
    active = dense_layers * dense + moe_layers * (attention + router + top_k * expert + shared)
    return every, active


def lora_params(cfg: dict[str, Any], model_config: dict | None, params: int) -> int:
    """Trainable LoRA parameters: r x (in + out) for every targeted linear layer."""
    r = int(cfg.get("lora_r") or 8)
    if not model_config or "hidden_size" not in model_config:
        return int(params * 0.01 * r / 16)
    shapes = linear_shapes(model_config)
    targets = LORA_LINEAR_NAMES if cfg.get("lora_target_linear") else (cfg.get("lora_target_modules") or ("q_proj", "v_proj"))
    per_layer = sum(r * sum(shapes[name]) for name in targets if name in shapes)
    return per_layer * model_config.get("num_hidden_layers", 1)


def planned_saves(cfg: dict[str, Any]) -> int | None:
    """How many checkpoints the run saves, when its config tells (None: it depends on the data)."""
    if cfg.get("save_strategy") == "no":
        return 0
    epochs = math.ceil(float(cfg.get("num_epochs") or 1))
    save_steps, max_steps = cfg.get("save_steps"), cfg.get("max_steps")
    first = 1 if cfg.get("save_first_step") else 0
    if isinstance(save_steps, float) and 0 < save_steps < 1:  # a fraction of the total steps
        return math.ceil(1 / save_steps) + first
    if isinstance(save_steps, (int, float)) and save_steps >= 1:
        return math.ceil(max_steps / save_steps) + first if max_steps else None
    return epochs * int(cfg.get("saves_per_epoch") or 1) + first  # Axolotl saves each epoch by default


def kept_checkpoints(cfg: dict[str, Any]) -> int:
    """The checkpoints on disk at the end: every save, at most save_total_limit of them (the
    Trainer deletes older ones; unset or 0, Axolotl keeps 4; below 0, all of them)."""
    saves = planned_saves(cfg)
    limit = cfg.get("save_total_limit") or AXOLOTL_KEPT_CHECKPOINTS
    if limit < 0:
        return saves if saves is not None else AXOLOTL_KEPT_CHECKPOINTS
    return limit if saves is None else min(limit, saves)


@dataclass(frozen=True)
class DiskEstimate:
    download: int
    checkpoint: int
    kept: int
    final: int
    merged: int

    @property
    def total(self) -> int:
        return int((self.download + self.kept * self.checkpoint + self.final + self.merged) * MARGIN)

    @property
    def in_run_dir(self) -> int:
        """What lands in the run directory (the download goes to the shared cache)."""
        return int((self.kept * self.checkpoint + self.final + self.merged) * MARGIN)

    def describe(self) -> str:
        parts = [f"{gib(self.download)} model download"] if self.download else []
        parts.append(f"{self.kept} checkpoint(s) of {gib(self.checkpoint)}")
        parts.append(f"{gib(self.final)} final output")
        if self.merged:
            parts.append(f"{gib(self.merged)} merged weights")
        return f"about {gib(self.total)} ({', '.join(parts)}, plus 10%)"


def estimate_disk(cfg: dict[str, Any], facts: ModelFacts, merge: bool = False) -> DiskEstimate | None:
    """Pure: None when the model's size is unknown (a Hub model that is not cached)."""
    if not facts.weight_bytes or not facts.params:
        return None
    weights = facts.weight_bytes
    if cfg.get("adapter") in LORA_ADAPTERS:
        adapter = lora_params(cfg, facts.config, facts.params) * 4
        checkpoint, final = adapter * 3, adapter
    else:
        checkpoint, final = weights + 8 * facts.params, weights
    return DiskEstimate(
        download=weights if facts.needs_download else 0,
        checkpoint=checkpoint,
        kept=kept_checkpoints(cfg),
        final=final,
        merged=weights if merge else 0,
    )


def gib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB"


def link_prebaked_model(base_model: str, hub_cache: Path, prebaked_cache: Path | None) -> bool:
    """A model baked into the image becomes visible in the volume's Hub cache (a
    symlink), so the first job on a fresh volume downloads nothing. True if linked."""
    if not prebaked_cache or base_model.startswith("/"):
        return False
    name = _cache_folder(base_model)
    source, target = prebaked_cache / name, hub_cache / name
    if not source.is_dir() or target.exists() or target.is_symlink():
        return False
    hub_cache.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source, target_is_directory=True)
    return True
