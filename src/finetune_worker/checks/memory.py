"""Peak GPU memory per GPU, estimated from the config before anything is downloaded.

    peak = (weights + trainable copies + gradients + optimizer states) / sharding
           + activations + logits + overhead, plus 10%

  weights      P x bytes per weight (bf16/fp16 2, fp32 4, 8-bit 1, 4-bit 0.5 + 10% for scales)
  trainable    LoRA: the adapter's T parameters kept in fp32 (4 bytes); full: the weights themselves
  gradients    T x bytes of the trainable dtype (full bf16: 2; LoRA: 4)
  optimizer    Adam's two states: T x 2 x (2 for a full bf16 fine-tune, else 4); 8-bit Adam: T x 2;
               offloaded to the CPU with zero3_offload / offload_optimizer
  sharding     ZeRO-1: optimizer / N; ZeRO-2: + gradients / N; ZeRO-3 and FSDP: + weights / N
  activations  per layer: micro_batch x sequence_len x hidden x 34 bytes (bf16, flash/SDPA attention:
               no seq^2 term); with gradient checkpointing, 2 bytes per layer plus one layer's 34
  logits       micro_batch x sequence_len x vocab x 4 bytes x 2 (fp32 logits and their gradient)
  overhead     1 GiB: CUDA context, kernels, allocator
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_worker.checks.resources import linear_shapes, lora_params
from finetune_worker.plan.distributed import deepspeed_offloads, deepspeed_stage

GIB = 2**30
OVERHEAD = 1 * GIB
MARGIN = 1.10
# "clearly cannot fit": the estimate is above the GPU's memory by more than its error.
CLEARLY_OVER = 1.25


def params_from_config(c: dict) -> int:
    """Parameter count of a Llama-shaped decoder from its config.json."""
    hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    per_layer = sum(fan_in * fan_out for fan_in, fan_out in linear_shapes(c).values()) + 2 * hidden  # + 2 norms
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings + hidden


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]
    num_gpus: int

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()) * MARGIN)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in self.parts.items() if value)
        return f"{self.total / GIB:.1f} GiB per GPU ({parts} GiB, +10%)"


def estimate_gpu_memory(cfg: dict[str, Any], model_config: dict, num_gpus: int = 1) -> MemoryEstimate:
    params = params_from_config(model_config)
    lora = cfg.get("adapter") in ("lora", "qlora")
    half = bool(cfg.get("bf16") or cfg.get("fp16")) or cfg.get("bf16") is None  # Axolotl's bf16 "auto" on a GPU
    if cfg.get("load_in_4bit") or cfg.get("adapter") == "qlora":
        weight_bytes = 0.55
    elif cfg.get("load_in_8bit"):
        weight_bytes = 1.0
    else:
        weight_bytes = 2.0 if half else 4.0
    trainable = lora_params(cfg, model_config, params) if lora else params
    train_bytes = 4.0 if lora or not half else 2.0
    state_bytes = 2.0 if "8bit" in str(cfg.get("optimizer") or "") else 2 * (2.0 if not lora and half else 4.0)

    stage = deepspeed_stage(cfg.get("deepspeed"))
    fsdp = bool(cfg.get("fsdp_config") or cfg.get("fsdp"))
    n = max(num_gpus, 1)
    shard_weights = n if stage == 3 or fsdp else 1
    shard_grads = n if (stage or 0) >= 2 or fsdp else 1
    shard_optimizer = n if (stage or 0) >= 1 or fsdp else 1
    offload_optimizer, offload_params = deepspeed_offloads(cfg.get("deepspeed")) if stage else (False, False)
    if fsdp and (cfg.get("fsdp_config") or {}).get("offload_params"):
        offload_optimizer = offload_params = True

    hidden, layers, vocab = model_config["hidden_size"], model_config["num_hidden_layers"], model_config["vocab_size"]
    tokens = int(cfg.get("micro_batch_size") or 1) * int(cfg.get("sequence_len") or 2048)
    act_bytes = 2 if half else 4
    if cfg.get("gradient_checkpointing"):
        activations = tokens * hidden * (layers * act_bytes + 34 * act_bytes // 2)
    else:
        activations = tokens * hidden * layers * 34 * act_bytes // 2
    parts = {
        "weights": 0 if offload_params else int(params * weight_bytes / shard_weights),
        "trainable copies": int(trainable * 4 / shard_weights) if lora else 0,
        "gradients": int(trainable * train_bytes / shard_grads),
        "optimizer": 0 if offload_optimizer else int(trainable * state_bytes / shard_optimizer),
        "activations": int(activations),
        "logits": tokens * vocab * 4 * 2,
        "overhead": OVERHEAD,
    }
    return MemoryEstimate(parts=parts, num_gpus=n)


def suggestions(cfg: dict[str, Any], num_gpus: int) -> str:
    ideas = []
    if cfg.get("adapter") not in ("lora", "qlora"):
        ideas.append("adapter: lora (or qlora with load_in_4bit: true)")
    elif cfg.get("adapter") == "lora":
        ideas.append("adapter: qlora with load_in_4bit: true")
    if num_gpus > 1 and deepspeed_stage(cfg.get("deepspeed")) != 3 and not cfg.get("fsdp_config"):
        ideas.append("deepspeed: zero3 (or fsdp_config: full_shard)")
    if int(cfg.get("micro_batch_size") or 1) > 1:
        ideas.append("a smaller micro_batch_size (raise gradient_accumulation_steps to keep the batch)")
    if not cfg.get("gradient_checkpointing"):
        ideas.append("gradient_checkpointing: true")
    return "; ".join(ideas) or "a GPU with more memory"
