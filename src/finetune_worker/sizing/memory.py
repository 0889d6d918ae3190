"""Peak GPU memory per GPU, estimated from the config before anything is downloaded.

    peak = weights + trainable copies + gradients + optimizer states (each / its sharding)
           + gathered layers + activations + logits + overhead, plus 10%

  P = all parameters, of which L sit in the decoder's linear layers (head_dim when the config
  sets it); T = trainable parameters (LoRA: r x (in + out) per targeted layer; full: P).

  weights      bf16/fp16 2 bytes, fp32 4; 4-bit: L x 0.55 (4 bits + scales) and the rest
               (embeddings, LM head, norms) still 16-bit; 8-bit: L x 1, the rest 16-bit
  trainable    LoRA: the adapter in fp32, T x 4
  gradients    LoRA T x 4; full bf16 T x 2; full with DeepSpeed T x 2, with FSDP T x 4 (fp32 shards)
  optimizer    Adam's two states, T x 8 (fp32), T x 4 for a full bf16 fine-tune on one GPU
               (bf16 states), T x 2 for 8-bit Adam. A full fine-tune under DeepSpeed adds fp32
               master weights (T x 4, 12 bytes in all); under FSDP mixed precision the sharded
               weights themselves are fp32 (4 bytes instead of 2)
  sharding     ZeRO-1: optimizer / N; ZeRO-2: + gradients / N; ZeRO-3 and FSDP: + weights / N.
               CPU offload (zero3_offload, FSDP offload_params) moves weights and optimizer off
  gathered     sharded weights are gathered on the GPU to compute: two decoder layers (the one
               running and the one prefetched) and the root unit (embeddings, LM head, norms),
               in their stored dtype; this is also the floor that stays with CPU offload
  activations  per layer micro_batch x sequence_len x hidden x 34 bytes (bf16, flash/SDPA
               attention: no seq^2 term); with gradient checkpointing 2 bytes per layer plus
               one layer's 34
  logits       micro_batch x sequence_len x vocab x 14 bytes: the bf16 logits (2), their fp32
               copy (4), the fp32 log-probabilities kept for backward (4) and their fp32
               gradient (4). With a fused cross-entropy (liger_fused_linear_cross_entropy, Cut
               Cross Entropy) the logits never exist whole: micro_batch x sequence_len x hidden
               x 8 (the fp32 gradient of the last hidden state, and one chunk of logits, which
               Liger sizes to about as many entries)
  overhead     1 GiB: CUDA context, kernels, allocator

`tests/memory_calibration.json` holds published peak-memory measurements and
`tests/test_memory_calibration.py` checks this estimate against them (and renders the
table of them in docs/operating.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_worker.checks.axolotl_schema import integration_name
from finetune_worker.checks.distributed import deepspeed_offloads, deepspeed_stage
from finetune_worker.contract.job import LORA_ADAPTERS
from finetune_worker.plan.fast_defaults import uses_cut_cross_entropy
from finetune_worker.sizing.resources import MARGIN, linear_params, lora_params

GIB = 2**30
OVERHEAD = 1 * GIB
# "clearly cannot fit": the estimate is above the GPU's memory by more than its error.
CLEARLY_OVER = 1.25
ACTIVATION_BYTES = 34  # per token, hidden unit and layer, in bf16
LOGIT_BYTES = 14  # per token and vocabulary entry, without a fused cross-entropy
FUSED_LOGIT_BYTES = 8  # per token and hidden unit, with one
QUANT_4BIT_BYTES = 0.55  # 4 bits + block scales
GATHERED_LAYERS = 2  # FSDP / ZeRO-3: the layer computing and the one prefetched


def params_from_config(c: dict) -> int:
    """Parameter count of a Llama-shaped decoder from its config.json (a mixture of experts: every expert)."""
    hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings") else 2)
    return linear_params(c)[0] + layers * 2 * hidden + embeddings + hidden  # + 2 norms per layer, + the final norm


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


def fused_cross_entropy(cfg: dict[str, Any]) -> bool:
    """Liger's fused linear cross-entropy or Cut Cross Entropy: the logits are never materialised whole."""
    liger = any(integration_name(plugin) == "liger" for plugin in cfg.get("plugins") or [])
    return bool(liger and cfg.get("liger_fused_linear_cross_entropy")) or uses_cut_cross_entropy(cfg)


def estimate_gpu_memory(cfg: dict[str, Any], model_config: dict, num_gpus: int = 1) -> MemoryEstimate:
    params = params_from_config(model_config)
    hidden, layers, vocab = model_config["hidden_size"], model_config["num_hidden_layers"], model_config["vocab_size"]
    linear = linear_params(model_config)[0]
    lora = cfg.get("adapter") in LORA_ADAPTERS
    half = bool(cfg.get("bf16") or cfg.get("fp16")) or cfg.get("bf16") is None  # Axolotl's bf16 "auto" on a GPU
    plain_bytes = 2.0 if half else 4.0
    if cfg.get("load_in_4bit") or cfg.get("adapter") == "qlora":
        linear_bytes = QUANT_4BIT_BYTES  # only the decoder's linear layers; embeddings and LM head stay 16-bit
    elif cfg.get("load_in_8bit"):
        linear_bytes = 1.0
    else:
        linear_bytes = plain_bytes
    other_bytes = 2.0 if linear_bytes < plain_bytes else plain_bytes
    layers_bytes = linear * linear_bytes  # the decoder layers' linear weights
    root_bytes = (params - linear) * other_bytes  # embeddings, LM head, norms
    weight_bytes = layers_bytes + root_bytes

    stage = deepspeed_stage(cfg.get("deepspeed"))
    fsdp = bool(cfg.get("fsdp_config") or cfg.get("fsdp"))
    n = max(num_gpus, 1)
    shard_weights = n if stage == 3 or fsdp else 1
    shard_grads = n if (stage or 0) >= 2 or fsdp else 1
    shard_optimizer = n if (stage or 0) >= 1 or fsdp else 1
    offload_optimizer, offload_params = deepspeed_offloads(cfg.get("deepspeed")) if stage else (False, False)
    if fsdp and (cfg.get("fsdp_config") or {}).get("offload_params"):
        offload_optimizer = offload_params = True

    trainable = lora_params(cfg, model_config, params) if lora else params
    eight_bit_adam = "8bit" in str(cfg.get("optimizer") or "")
    weights = weight_bytes
    if lora:
        grad_bytes, state_bytes = 4.0, 2.0 if eight_bit_adam else 8.0
    elif not half:
        grad_bytes, state_bytes = 4.0, 2.0 if eight_bit_adam else 8.0
    elif stage:  # DeepSpeed mixed precision: bf16 weights and gradients, fp32 master weights + Adam
        grad_bytes, state_bytes = 2.0, 4.0 + (2.0 if eight_bit_adam else 8.0)
    elif fsdp:  # FSDP mixed precision: the sharded weights and gradients are fp32
        weights = params * 4.0
        grad_bytes, state_bytes = 4.0, 2.0 if eight_bit_adam else 8.0
    else:  # one GPU (or DDP): bf16 weights, gradients and Adam states
        grad_bytes, state_bytes = 2.0, 2.0 if eight_bit_adam else 4.0

    gathered = 0
    if shard_weights > 1 or offload_params:
        gathered = int(root_bytes + GATHERED_LAYERS * layers_bytes / layers)

    tokens = int(cfg.get("micro_batch_size") or 1) * int(cfg.get("sequence_len") or 2048)
    act_bytes = 2 if half else 4
    if cfg.get("gradient_checkpointing"):
        activations = tokens * hidden * (layers * act_bytes + ACTIVATION_BYTES * act_bytes // 2)
    else:
        activations = tokens * hidden * layers * ACTIVATION_BYTES * act_bytes // 2
    logits = tokens * hidden * FUSED_LOGIT_BYTES if fused_cross_entropy(cfg) else tokens * vocab * LOGIT_BYTES
    parts = {
        "weights": 0 if offload_params else int(weights / shard_weights),
        "trainable copies": int(trainable * 4 / shard_weights) if lora else 0,
        "gradients": int(trainable * grad_bytes / shard_grads),
        "optimizer": 0 if offload_optimizer else int(trainable * state_bytes / shard_optimizer),
        "gathered layers": gathered,
        "activations": int(activations),
        "logits": int(logits),
        "overhead": OVERHEAD,
    }
    return MemoryEstimate(parts=parts, num_gpus=n)


def suggestions(cfg: dict[str, Any], num_gpus: int) -> str:
    ideas = []
    if cfg.get("adapter") not in LORA_ADAPTERS:
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
