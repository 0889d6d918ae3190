"""Published training throughput, and the utilisation each GPU class is estimated at.

Every measurement below is a published run: where it was read (`url`), its setup (model,
method, sequence length, GPUs, gradient checkpointing), and what was published (a time for
a known number of tokens, tokens per second, an MFU or model TFLOPs). From the setup,
`sizing/throughput.py` recomputes the tokens per second per GPU and the hardware FLOPs
utilisation (HFU: the worker's FLOPs per token, with the recomputation of gradient
checkpointing, over the GPU's dense BF16 peak); `tests/test_throughput_calibration.py`
recomputes each published figure from its setup and checks that every default in
`UTILISATION` is the median of the sources it names, rounded down to 0.05.

Sources read on 2026-12-02 (design 30, section 4). Looked for and not usable as absolute
figures: Unsloth's benchmark pages (speed-ups relative to HF + FA2 only), Liger-Kernel's
examples/huggingface/README.md (throughput only as a chart), litgpt's config_hub/finetune
README (runtimes without token counts), the Hugging Face packing blog (relative gains). No
Axolotl-published tokens per second was found.
"""

from __future__ import annotations

from dataclasses import dataclass

# config.json shapes of the models the sources ran (Llama-3 and 3.1 8B share theirs).
MODELS: dict[str, dict] = {
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "Llama-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "Mistral-7B-v0.2": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class Published:
    value: float
    unit: str  # "s" (for the setup's tokens), "tokens/s/GPU", "tokens/s" (all GPUs), "MFU %", "model TFLOPs/GPU"


@dataclass(frozen=True)
class Source:
    id: str
    url: str
    model: str  # a key of MODELS
    method: str  # full, lora, qlora
    sequence_len: int  # every sample this long (packed, or fixed-length dummy data)
    gpu: str
    peak_tflops: float  # the GPU's dense BF16 peak, as in sizing/gpus.py
    gpu_class: str
    count: int
    gc: bool  # gradient checkpointing (full recomputation of each layer's forward)
    rate: Published  # what gives the tokens per second
    check: Published | None = None  # a second published figure, recomputed with the source's own accounting
    accounting: str = "worker"  # how `check` counts FLOPs: worker, torchtitan, nemo
    lora_r: int = 0
    samples: int = 0  # with rate in "s": samples x sequence_len tokens
    note: str = ""
    outside_bounds: str | None = None  # kept, but not used for a default: why

    @property
    def tokens(self) -> int:
        return self.samples * self.sequence_len


TORCHTITAN = "https://github.com/pytorch/torchtitan/blob/main/docs/performance.md"
NEMO = "https://github.com/NVIDIA-NeMo/Automodel/blob/main/docs/performance-summary.md"
ANSWERAI = "https://github.com/AnswerDotAI/fsdp_qlora/blob/main/benchmarks_03_2024.md"
TORCHTUNE = "https://github.com/pytorch/torchtune/blob/0031bfb/README.md#memory-and-training-speed"

SOURCES: tuple[Source, ...] = (
    Source("tt-a100", TORCHTITAN, "Llama-3-8B", "full", 8192, "A100 80GB", 312, "ampere", 64, False,
           Published(2973, "tokens/s/GPU"), Published(58.2, "MFU %"), accounting="torchtitan",
           note="FSDP2, local batch 1, selective-op activation checkpointing (not counted as recomputation), bf16"),
    Source("tt-h100", TORCHTITAN, "Llama-3-8B", "full", 8192, "H100 96GB HBM2e (500 W)", 989, "hopper", 8, False,
           Published(5762, "tokens/s/GPU"), note="Llama 3.1 8B, FSDP, batch 2, selective AC (Table 1, Grand Teton)"),
    Source("tt-h100-compile", TORCHTITAN, "Llama-3-8B", "full", 8192, "H100 96GB HBM2e (500 W)", 989, "hopper", 8, False,
           Published(6667, "tokens/s/GPU"), note="as tt-h100, + torch.compile"),
    Source("nemo-lora70", NEMO, "Llama-3-70B", "lora", 4096, "H100 80GB", 989, "hopper", 8, True,
           Published(608.42, "tokens/s/GPU"), Published(176, "model TFLOPs/GPU"), accounting="nemo", lora_r=8,
           note="NeMo Automodel 2025-10-02: LoRA, GBS 32, TP2 PP4 VP10, mock data; activation checkpointing and r assumed"),
    Source("aai-70b-h100", ANSWERAI, "Llama-2-70B", "qlora", 2048, "H100 80GB SXM", 989, "hopper", 4, True,
           Published(667, "s"), lora_r=64, samples=1024, note="FSDP QLoRA r64 all-linear, batch 8, reentrant GC, 1024 dummy samples"),
    Source("aai-70b-a100-8", ANSWERAI, "Llama-2-70B", "qlora", 2048, "A100 40GB SXM", 312, "ampere", 8, True,
           Published(672, "s"), lora_r=64, samples=1024, note="FSDP QLoRA r64 all-linear, batch 4"),
    Source("aai-70b-a100-4", ANSWERAI, "Llama-2-70B", "qlora", 2048, "A100 40GB SXM", 312, "ampere", 4, True,
           Published(1266, "s"), lora_r=64, samples=1024, note="FSDP QLoRA r64 all-linear, batch 4"),
    Source("aai-7b-4090-lora", ANSWERAI, "Llama-2-7B", "lora", 2048, "RTX 4090 (PCIe x16)", 165.2, "ada-geforce", 2, True,
           Published(437, "s"), lora_r=64, samples=1024, note="Dual 4090 Budget Workstation: LoRA DDP, batch 4"),
    Source("aai-7b-4090-qlora", ANSWERAI, "Llama-2-7B", "qlora", 2048, "RTX 4090 (PCIe x16)", 165.2, "ada-geforce", 2, True,
           Published(450, "s"), lora_r=64, samples=1024, note="Dual 4090 Budget Workstation: QLoRA DDP, batch 8"),
    Source("aai-mistral-2k", ANSWERAI, "Mistral-7B-v0.2", "qlora", 2048, "RTX 4090 (PCIe x16)", 165.2, "ada-geforce", 2, True,
           Published(2200, "tokens/s/GPU"), lora_r=64, note="Bonus: Mistral 7B; FSDP + CPU offload, batch 12 x 2048"),
    Source("aai-mistral-24k", ANSWERAI, "Mistral-7B-v0.2", "qlora", 24576, "RTX 4090 (PCIe x16)", 165.2, "ada-geforce", 2, True,
           Published(1615, "tokens/s/GPU"), lora_r=64,
           note="as aai-mistral-2k at batch 1 x 24576: the attention term's check (without it the two would differ by a third)"),
    Source("tune-4090-full", TORCHTUNE, "Llama-3-8B", "full", 2048, "RTX 4090", 165.2, "ada-geforce", 1, True,
           Published(1650, "tokens/s/GPU"), note="Llama 3.1 8B, batch 2, packed to 2048, torch.compile; AC assumed on"),
    Source("tune-4090-lora", TORCHTUNE, "Llama-3-8B", "lora", 2048, "RTX 4090", 165.2, "ada-geforce", 1, True,
           Published(3083, "tokens/s/GPU"), lora_r=8, note="as tune-4090-full",
           outside_bounds="HFU above 75%: torchtune's token count is not the worker's here"),
    Source("tune-4090-qlora", TORCHTUNE, "Llama-3-8B", "qlora", 2048, "RTX 4090", 165.2, "ada-geforce", 1, True,
           Published(2413, "tokens/s/GPU"), lora_r=8, note="as tune-4090-full"),
    Source("tune-a100-lora", TORCHTUNE, "Llama-3-70B", "lora", 2048, "A100 80GB", 312, "ampere", 8, True,
           Published(3497, "tokens/s"), lora_r=8, note="Llama 3.1 70B on 8 GPUs; read as the total over 8 (per GPU it would exceed 100%)"),
    Source("tune-a100-full", TORCHTUNE, "Llama-3-70B", "full", 2048, "A100 80GB", 312, "ampere", 8, True,
           Published(1568, "tokens/s"), note="Llama 3.1 70B on 8 GPUs, CPU offload and fused optimizer; total over 8"),
    Source("tune-a6000-full", TORCHTUNE, "Llama-3-8B", "full", 2048, "RTX A6000", 154.8, "ampere", 1, True,
           Published(2579, "tokens/s/GPU"), note="8B on one A6000",
           outside_bounds="HFU above 100% against the datasheet peak: torchtune counts tokens differently there"),
    Source("tune-a6000-lora", TORCHTUNE, "Llama-3-8B", "lora", 2048, "RTX A6000", 154.8, "ampere", 1, True,
           Published(4699, "tokens/s/GPU"), lora_r=8, note="8B on one A6000",
           outside_bounds="HFU above 100% against the datasheet peak: torchtune counts tokens differently there"),
)
BY_ID = {source.id: source for source in SOURCES}


@dataclass(frozen=True)
class Utilisation:
    value: float  # HFU
    sources: tuple[str, ...]  # the median of these sources' HFU, rounded down to 0.05
    assumed: str = ""  # no source: why this figure


# (GPU class, full | lora) -> the HFU an estimate uses until the endpoint has measured its own.
# QLoRA uses the LoRA figure; its dequantisation is costed apart (sizing/throughput.py).
UTILISATION: dict[tuple[str, str], Utilisation] = {
    ("hopper", "full"): Utilisation(0.30, ("tt-h100", "tt-h100-compile")),
    ("hopper", "lora"): Utilisation(0.30, ("nemo-lora70", "aai-70b-h100")),
    ("ampere", "full"): Utilisation(0.40, ("tt-a100", "tune-a100-full")),
    ("ampere", "lora"): Utilisation(0.55, ("aai-70b-a100-8", "aai-70b-a100-4", "tune-a100-lora")),
    ("ada-geforce", "full"): Utilisation(0.60, ("tune-4090-full",)),
    ("ada-geforce", "lora"): Utilisation(0.60, ("aai-7b-4090-lora", "aai-7b-4090-qlora", "aai-mistral-2k", "aai-mistral-24k",
                                                "tune-4090-qlora")),
    ("ada-datacenter", "full"): Utilisation(0.40, (), "none found; the L40S has the full-rate 362 TFLOPS on 864 GB/s, so ampere's full figure"),
    ("ada-datacenter", "lora"): Utilisation(0.40, (), "none found; as ada-datacenter full"),
    ("blackwell-geforce", "full"): Utilisation(0.60, (), "none found; assumed as ada-geforce"),
    ("blackwell-geforce", "lora"): Utilisation(0.60, (), "none found; assumed as ada-geforce"),
    ("blackwell", "full"): Utilisation(0.30, (), "none found; assumed as hopper"),
    ("blackwell", "lora"): Utilisation(0.30, (), "none found; assumed as hopper"),
}
