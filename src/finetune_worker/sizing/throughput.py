"""How long a training takes and what it costs on a GPU type, from its tokens and the model's shape.

Pure arithmetic, no I/O. Notation: L layers, h hidden, d_a = heads x head_dim, V vocabulary.

  N_mm    parameters that take part in a matmul: the decoder's linear layers + the LM head
          (V x h, also when tied to the embeddings; the embedding lookup is no matmul).
          A mixture of experts counts the experts a token runs (num_experts_per_tok), its
          shared experts and its router; its memory keeps them all (sizing/memory.py).
  N_lora  r x (in + out) over the targeted layers (sizing/resources.lora_params).
  l_tok   sum(l^2) / sum(l) over the samples: the token-weighted mean length.

Model FLOPs per processed token (the numerator of MFU):
  full    6 N_mm + A     forward 2N, backward 4N (Kaplan et al. 2020, C = 6N)
  LoRA    4 N_mm + 6 N_lora + A   the frozen base gets no weight gradients (Hu et al. 2021)
  QLoRA   as LoRA (the matmuls run in bf16 after dequantisation, Dettmers et al. 2023), plus
          the dequantisation's time: it is memory-bound, costed on the GPU's bandwidth
  A       6 L d_a l_tok: causal attention, forward 2 d_a l per layer (QK^T and AV over l/2
          keys on average), x3 with backward; l is capped at sliding_window
  DPO-like + 2 N_mm for the reference model's forward (not ORPO/SimPO)
Hardware FLOPs add one more forward with gradient checkpointing, R = 2 N_mm + A/3
(Korthikanti et al. 2022's HFU). Utilisation (sizing/throughput_sources.py) is HFU, so a
run with and one without checkpointing are costed at the same utilisation.

Time on n GPUs of type g: processed tokens x F_hw / (n x peak_g x u x s_n) + dequantisation
+ checkpoint saves; s_n (scaling) is 1 on one GPU, 0.95 over NVLink, 0.85 over PCIe, and
x0.9 again for ZeRO-3/FSDP over PCIe (the weights cross the bus every step): assumed.

Evaluation (the `evaluate` phase):
  during training  E passes over the eval split, each its processed tokens x (2 N_mm + A/3)
                   (a forward) at the training's pace; E from eval_steps, evals_per_epoch or
                   eval_strategy as Axolotl 0.21 hands them to the Trainer, + 1 at step 0
                   (Axolotl's eval_on_start default)
  the job's        load the base model (and a full fine-tune's own weights), then each model
  `evaluation`     generates max_new_tokens for ceil(num_examples / 8) batches; a decoding step
                   reads every active weight (2 bytes) at half the bandwidth plus 0.6 ms per
                   layer of launch overhead: assumed, not calibrated
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune_worker.contract.job import GENERATION_BATCH, LORA_ADAPTERS
from finetune_worker.sizing.gpus import Gpu
from finetune_worker.sizing.resources import linear_params, lora_params
from finetune_worker.sizing.throughput_sources import MODELS, UTILISATION, Source

PAD_MULTIPLE = 64  # Axolotl pads a batch to a multiple of 64 tokens (pad_to_multiple_of)
REFERENCE_MODEL_RL = ("dpo", "ipo", "kto")  # a frozen reference model runs a forward per token
ONLINE_RL = ("grpo", "gdpo", "ebft")
DEQUANT_BYTES = 2.56  # per 4-bit weight and pass: 0.56 read (4 bits + absmax) + 2 written (bf16)
DEQUANT_BANDWIDTH = 0.7  # share of the memory bandwidth a dequantisation kernel reaches
NVLINK_SCALING, PCIE_SCALING, PCIE_SHARDED = 0.95, 0.85, 0.9
LOAD_OVERHEAD_S = 15.0  # CUDA init, building the trainer
QUANTISE_PARAMS_PER_S = 2e9  # bitsandbytes quantising a model on load
MERGE_OVERHEAD_S = 10.0
DECODE_BANDWIDTH = 0.5  # share of the memory bandwidth a generate() step reaches reading the weights: assumed
DECODE_LAYER_OVERHEAD_S = 6e-4  # per layer and generate() step, Python and kernel launches: assumed
HF_LOGGING_STEPS = 500  # Transformers' default logging_steps, eval_steps's fallback


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    attention_dim: int  # heads x head_dim
    vocab: int
    matmul_params: int  # N_mm with every expert
    active_params: int  # N_mm a token runs through
    linear_params: int  # the decoder's linear layers (what 4-bit quantises), every expert
    sliding_window: int | None
    moe: bool


def model_shape(config: dict) -> Shape:
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config.get("num_attention_heads", 1)
    head_dim = config.get("head_dim") or hidden // heads
    every, active = linear_params(config)
    head = config["vocab_size"] * hidden
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    return Shape(layers=layers, hidden=hidden, attention_dim=heads * head_dim, vocab=config["vocab_size"],
                 matmul_params=every + head, active_params=active + head, linear_params=every,
                 sliding_window=int(window) if window else None, moe=active != every)


def method_of(cfg: dict) -> str:
    """full, lora or qlora, as the config trains."""
    adapter = cfg.get("adapter")
    if adapter == "qlora" or (adapter == "lora" and cfg.get("load_in_4bit")):
        return "qlora"
    return "lora" if adapter in LORA_ADAPTERS else "full"


@dataclass(frozen=True)
class Work:
    model: float  # FLOPs per processed token, counted once (MFU)
    hardware: float  # with gradient checkpointing's recomputation (HFU)


def attention_flops(shape: Shape, token_weighted_length: float) -> float:
    length = min(token_weighted_length, shape.sliding_window) if shape.sliding_window else token_weighted_length
    return 6 * shape.layers * shape.attention_dim * length


def flops_per_token(shape: Shape, method: str, lora_params: int, token_weighted_length: float,
                    checkpointing: bool, reference_forward: bool = False) -> Work:
    n = shape.active_params
    attention = attention_flops(shape, token_weighted_length)
    model = (6 * n if method == "full" else 4 * n + 6 * lora_params) + attention
    if reference_forward:
        model += 2 * n
    recompute = 2 * n + attention / 3 if checkpointing else 0.0
    return Work(model=model, hardware=model + recompute)


# -- tokens ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Lengths:
    """The prepared train split's sample lengths, as the preflight measures them."""

    rows: int
    tokens: int
    sum_squares: int
    histogram: tuple[int, ...] = ()  # rows per 64-token bucket: bucket b holds lengths in (64 b, 64 (b + 1)]
    packed_bins: int | None = None  # sequences after Axolotl's packing at sequence_len

    @property
    def token_weighted_length(self) -> float:
        return self.sum_squares / self.tokens if self.tokens else 0.0


def padded_length(histogram: tuple[int, ...], micro_batch: int, cap: int) -> float:
    """Expected length a row is padded to in a shuffled batch of `micro_batch` rows: the
    longest of the batch rounded up to 64. With F the lengths' distribution over 64-token
    buckets, E = sum_b top_b x (F_b^mb - F_(b-1)^mb)."""
    rows = sum(histogram)
    if not rows:
        return 0.0
    expected, below, cumulative = 0.0, 0.0, 0
    for bucket, count in enumerate(histogram):
        cumulative += count
        share = (cumulative / rows) ** micro_batch
        expected += min(PAD_MULTIPLE * (bucket + 1), cap) * (share - below)
        below = share
    return expected


@dataclass(frozen=True)
class Schedule:
    steps: int
    sequences_per_epoch: int  # packed bins, or rows
    tokens_per_sequence: float  # processed (with padding), per sequence
    epochs: float  # of the data, as trained (max_steps may cut or extend it)
    train_tokens: int  # real tokens trained, all epochs
    processed_tokens: int  # with padding, all epochs, all GPUs

    @property
    def packing_efficiency(self) -> float | None:
        real = self.train_tokens / self.epochs if self.epochs else 0
        per_epoch = self.sequences_per_epoch * self.tokens_per_sequence
        return round(real / per_epoch, 4) if per_epoch else None


def schedule(lengths: Lengths, cfg: dict, count: int) -> Schedule:
    """Steps and tokens of the run on `count` GPUs (data parallel: each takes its micro-batches)."""
    micro_batch = int(cfg.get("micro_batch_size") or 1)
    accumulation = int(cfg.get("gradient_accumulation_steps") or 1)
    sequence_len = int(cfg.get("sequence_len") or 2048)
    if cfg.get("sample_packing") and lengths.packed_bins:
        sequences, per_sequence = lengths.packed_bins, float(sequence_len)
    elif cfg.get("pad_to_sequence_len"):
        sequences, per_sequence = lengths.rows, float(sequence_len)
    else:
        sequences = lengths.rows
        per_sequence = padded_length(lengths.histogram, micro_batch, math.ceil(sequence_len / PAD_MULTIPLE) * PAD_MULTIPLE)
    per_step = micro_batch * accumulation * count
    if cfg.get("max_steps"):
        steps = int(cfg["max_steps"])
    else:
        steps = math.ceil(float(cfg.get("num_epochs") or 1) * math.ceil(sequences / per_step)) if sequences else 0
    epochs = steps * per_step / sequences if sequences else 0.0
    if not cfg.get("max_steps"):
        epochs = min(epochs, float(cfg.get("num_epochs") or 1))
    return Schedule(steps=steps, sequences_per_epoch=sequences, tokens_per_sequence=per_sequence, epochs=epochs,
                    train_tokens=int(lengths.tokens * epochs), processed_tokens=int(steps * per_step * per_sequence))


# -- time and cost ----------------------------------------------------------------------


def scaling(gpu: Gpu, count: int, sharded: bool) -> float:
    """Share of n x one GPU's pace that n GPUs reach (assumed until an endpoint measures its own)."""
    if count <= 1:
        return 1.0
    if gpu.nvlink:
        return NVLINK_SCALING
    return PCIE_SCALING * (PCIE_SHARDED if sharded else 1.0)


def utilisation(gpu: Gpu, method: str) -> tuple[float, str]:
    """(HFU, where it is from) for a GPU type and a method, from the published runs."""
    kind = "full" if method == "full" else "lora"
    entry = UTILISATION[(gpu.gpu_class, kind)]
    where = f"median of {', '.join(entry.sources)}" if entry.sources else f"assumed: {entry.assumed}"
    return entry.value, f"utilisation {gpu.gpu_class}/{kind} {entry.value:.2f} ({where})"


def dequantisation_seconds(shape: Shape, gpu: Gpu, micro_batches_per_gpu: int, checkpointing: bool) -> float:
    """QLoRA: each pass over the layers (forward, backward, and the recomputed forward with
    checkpointing) writes every 4-bit weight back as bf16, bound by the memory bandwidth."""
    passes = 3 if checkpointing else 2
    per_pass = DEQUANT_BYTES * shape.linear_params / (DEQUANT_BANDWIDTH * gpu.bandwidth_gbs * 1e9)
    return micro_batches_per_gpu * passes * per_pass


@dataclass(frozen=True)
class Rates:
    """Bytes per second of the worker's transfers (FINETUNE_DOWNLOAD_MBPS, _VOLUME_MBPS, _UPLOAD_MBPS)."""

    download: float = 150e6
    volume: float = 300e6
    upload: float = 50e6


@dataclass(frozen=True)
class Fixed:
    """What a run moves besides its training, for the fixed phases."""

    weight_bytes: int = 0  # the base model's weights
    needs_download: bool = False
    checkpoint_bytes: int = 0
    saves: int = 0
    push_bytes: int = 0  # what goes to the Hub (0: no push)
    merge: bool = False
    tokenize_seconds: float = 0.0
    params: int = 0  # for QLoRA's quantisation on load


@dataclass(frozen=True)
class Evaluation:
    """What a run evaluates: the eval split during training, and the job's `evaluation` after it."""

    lengths: Lengths | None = None  # the prepared eval split (val_set_size or test_datasets)
    examples: int = 0  # the job's evaluation: prompts each model answers (num_examples)
    new_tokens: int = 0  # their max_new_tokens
    full_model: bool = False  # a full fine-tune loads weights of its own; an adapter rides on the base's


def evaluations(cfg: dict, steps: int, epochs: float) -> int:
    """How often the Trainer evaluates the eval split in `steps` steps, as Axolotl 0.21 sets it
    up (utils/config: evals_per_epoch -> a fraction of the steps; core/builders/base: the
    strategy, and eval_on_start unless the config says false)."""
    if cfg.get("eval_strategy") == "no" or not steps:
        return 0
    every = cfg.get("eval_steps")
    if not every and cfg.get("evals_per_epoch"):
        fraction = 1.0 / (int(cfg["evals_per_epoch"]) * float(cfg.get("num_epochs") or 1))
        every = fraction if fraction < 1 else None
    if not every and cfg.get("eval_strategy") == "steps":
        every = int(cfg.get("logging_steps") or HF_LOGGING_STEPS)
    on_start = int(cfg.get("eval_on_start") is not False)
    if every:
        interval = max(1, math.ceil(every * steps) if every < 1 else int(every))
        return on_start + steps // interval
    if cfg.get("eval_strategy") == "epoch":
        return on_start + math.ceil(epochs)
    return 0


def eval_pass_tokens(lengths: Lengths, cfg: dict, count: int) -> int:
    """Tokens one evaluation processes: each rank's batches of eval_batch_size (else
    micro_batch_size), packed when eval_sample_packing (else sample_packing) says so."""
    batch = int(cfg.get("eval_batch_size") or cfg.get("micro_batch_size") or 1)
    packing = cfg.get("eval_sample_packing")
    one_pass = {**cfg, "micro_batch_size": batch, "gradient_accumulation_steps": 1, "num_epochs": 1, "max_steps": None,
                "sample_packing": cfg.get("sample_packing") if packing is None else packing}
    return schedule(lengths, one_pass, count).processed_tokens


def training_eval_seconds(evaluation: Evaluation, cfg: dict, shape: Shape, schedule_: Schedule, gpu: Gpu, count: int, hfu: float,
                          sharded: bool) -> float:
    """The evaluations during training: forward passes over the eval split at the training's pace."""
    if evaluation.lengths is None or not evaluation.lengths.rows:
        return 0.0
    passes = evaluations(cfg, schedule_.steps, schedule_.epochs)
    forward = 2 * shape.active_params + attention_flops(shape, evaluation.lengths.token_weighted_length) / 3
    tokens = passes * eval_pass_tokens(evaluation.lengths, cfg, count) if passes else 0
    return tokens * forward / flops_per_second(gpu, count, hfu, sharded)


def load_seconds(fixed: Fixed, rates: Rates) -> float:
    """Reading the base model's weights from the volume, plus the process's own start (CUDA, the trainer or generator)."""
    return fixed.weight_bytes / rates.volume + LOAD_OVERHEAD_S


def decode_step_seconds(shape: Shape, gpu: Gpu) -> float:
    return 2 * shape.active_params / (DECODE_BANDWIDTH * gpu.bandwidth_gbs * 1e9) + DECODE_LAYER_OVERHEAD_S * shape.layers


def comparison_seconds(evaluation: Evaluation, shape: Shape, gpu: Gpu, fixed: Fixed, rates: Rates) -> float:
    """The job's `evaluation` after training: the base model and the fine-tune each answer the examples."""
    if not evaluation.examples or not evaluation.new_tokens:
        return 0.0
    loads = (2 if evaluation.full_model else 1) * load_seconds(fixed, rates)
    steps = 2 * math.ceil(evaluation.examples / GENERATION_BATCH) * evaluation.new_tokens
    return loads + steps * decode_step_seconds(shape, gpu)


def fixed_phases(fixed: Fixed, method: str, rates: Rates) -> dict[str, float]:
    phases = {
        "download": fixed.weight_bytes / rates.download if fixed.needs_download else 0.0,
        "load": load_seconds(fixed, rates) + (fixed.params / QUANTISE_PARAMS_PER_S if method == "qlora" else 0.0),
        "tokenize": fixed.tokenize_seconds,
        "save": fixed.saves * fixed.checkpoint_bytes / rates.volume,
        "merge": 2 * fixed.weight_bytes / rates.volume + MERGE_OVERHEAD_S if fixed.merge else 0.0,
        "push": fixed.push_bytes / rates.upload,
    }
    return {name: round(seconds, 1) for name, seconds in phases.items()}


def flops_per_second(gpu: Gpu, count: int, hfu: float, sharded: bool) -> float:
    """What `count` GPUs of this type deliver at this utilisation: the pace of training and of its eval passes."""
    return count * gpu.peak_flops * hfu * scaling(gpu, count, sharded)


def train_seconds(schedule_: Schedule, work: Work, gpu: Gpu, count: int, hfu: float, sharded: bool) -> float:
    return schedule_.processed_tokens * work.hardware / flops_per_second(gpu, count, hfu, sharded)


def cheapest(rows: list[dict]) -> dict | None:
    priced = [row for row in rows if row["fits"] and row.get("cost_usd") is not None]
    return min(priced, key=lambda row: (row["cost_usd"], row["total_seconds"]), default=None)


def fastest(rows: list[dict]) -> dict | None:
    timed = [row for row in rows if row["fits"] and row.get("total_seconds") is not None]
    return min(timed, key=lambda row: (row["total_seconds"], row.get("cost_usd") or math.inf), default=None)


# -- the published runs, recomputed (sizing/throughput_sources.py) -----------------------


def source_tokens_per_second(source: Source) -> float:
    """Per GPU, from what was published."""
    rate = source.rate
    if rate.unit == "s":
        return source.tokens / rate.value / source.count
    if rate.unit == "tokens/s":
        return rate.value / source.count
    if rate.unit == "tokens/s/GPU":
        return rate.value
    raise ValueError(f"{source.id}: no tokens per second in {rate.unit}")


def source_work(source: Source) -> Work:
    config = MODELS[source.model]
    shape = model_shape(config)
    lora = 0
    if source.method != "full":
        lora = lora_params({"lora_r": source.lora_r, "lora_target_linear": True}, config, 0)
    return flops_per_token(shape, source.method, lora, float(source.sequence_len), source.gc)


def source_utilisation(source: Source) -> tuple[float, float]:
    """(MFU, HFU) the source reached, by the worker's accounting."""
    work = source_work(source)
    rate = source_tokens_per_second(source)
    peak = source.peak_tflops * 1e12
    return rate * work.model / peak, rate * work.hardware / peak
