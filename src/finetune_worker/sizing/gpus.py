"""The GPU types an estimate is made for: their dense BF16 peak, memory, bandwidth, link, and price.

Names are RunPod's "GPU ID"s (runpod/docs `references/gpu-types.mdx`, table "last generated
2026-02-12", read 2026-12-02). They equal `torch.cuda.get_device_name()`, so a running worker
finds its own GPU here by exact name (`gpu_for`).

Peaks are dense (no sparsity) BF16 tensor-core TFLOPS from NVIDIA's datasheets and
whitepapers; for GeForce cards the rate with FP32 accumulate, which is what PyTorch uses.
The figures were taken from the worker's design notes (design 30, section 3) and were not
re-read from the PDFs named next to them.

Prices are US dollars per GPU-hour of RunPod **serverless flex** workers, from runpod/docs
`snippets/serverless-gpu-pricing-table.mdx` at commit e5571ba1 (2026-06-08), the last version
before RunPod replaced the table by a link to its pricing page (88f403cb, 2026-06-29); read
2026-12-02. A serverless worker with n GPUs is billed n x the per-GPU price. The operator
replaces or adds prices with FINETUNE_GPU_PRICES (Pods, other providers, newer prices); a type
without a price gets no cost and never wins "cheapest".
"""

from __future__ import annotations

from dataclasses import dataclass

PRICES_SOURCE = "RunPod serverless flex prices, runpod/docs e5571ba1 (published 2026-06-08)"
PRICES_READ = "2026-12-02"
GIB = 2**30
USABLE_MEMORY = 0.97  # RunPod's nominal GB read as GiB, less what the driver keeps (until a run measures it)


@dataclass(frozen=True)
class Gpu:
    name: str  # RunPod's GPU ID = torch's device name
    short: str  # RunPod's display name
    peak_tflops: float  # dense BF16 tensor TFLOPS
    memory_gb: float  # nominal
    bandwidth_gbs: float  # memory bandwidth, GB/s
    nvlink: bool  # GPUs of a worker talk over NVLink (else PCIe)
    gpu_class: str  # which utilisation figures apply (sizing/throughput_sources.py)
    price_per_hour: float | None  # USD per GPU-hour, RunPod serverless flex; None: none published
    compute_capability: tuple[int, int]
    source: str  # where the peak is from
    offered: bool = True  # RunPod offers this type

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def usable_memory_bytes(self) -> int:
        return int(self.memory_gb * GIB * USABLE_MEMORY)


GPUS: tuple[Gpu, ...] = (
    Gpu("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2, 24, 1008, False, "ada-geforce", 1.116, (8, 9),
        "NVIDIA Ada Lovelace architecture whitepaper, appendix (RTX 4090): 165.2 dense BF16 with FP32 accumulate (330.3 with FP16 accumulate)"),
    Gpu("NVIDIA GeForce RTX 5090", "RTX 5090", 209.5, 32, 1792, False, "blackwell-geforce", None, (12, 0),
        "NVIDIA RTX Blackwell GPU architecture whitepaper (RTX 5090): 209.5 dense BF16 with FP32 accumulate (419 FP16 accumulate)"),
    Gpu("NVIDIA L40S", "L40S", 362.05, 48, 864, False, "ada-datacenter", 1.908, (8, 9),
        "NVIDIA L40S datasheet: 362.05 dense BF16 (733 with sparsity)"),
    Gpu("NVIDIA A40", "A40", 149.7, 48, 696, False, "ampere", 1.224, (8, 6),
        "NVIDIA A40 datasheet: 149.7 dense BF16 (299.4 with sparsity)"),
    Gpu("NVIDIA A100-PCIE-40GB", "A100 PCIe 40GB", 312, 40, 1555, False, "ampere", None, (8, 0),
        "NVIDIA A100 datasheet: 312 dense BF16", offered=False),
    Gpu("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB", 312, 40, 1555, True, "ampere", None, (8, 0),
        "NVIDIA A100 datasheet: 312 dense BF16", offered=False),
    Gpu("NVIDIA A100 80GB PCIe", "A100 PCIe", 312, 80, 1935, False, "ampere", 2.736, (8, 0),
        "NVIDIA A100 datasheet: 312 dense BF16"),
    Gpu("NVIDIA A100-SXM4-80GB", "A100 SXM", 312, 80, 2039, True, "ampere", 2.736, (8, 0),
        "NVIDIA A100 datasheet: 312 dense BF16"),
    Gpu("NVIDIA H100 PCIe", "H100 PCIe", 756, 80, 2000, False, "hopper", 4.176, (9, 0),
        "NVIDIA H100 datasheet (PCIe): 756 dense BF16 (1513 with sparsity)"),
    Gpu("NVIDIA H100 80GB HBM3", "H100 SXM", 989, 80, 3350, True, "hopper", 4.176, (9, 0),
        "NVIDIA H100 datasheet (SXM): 989 dense BF16 (1979 with sparsity)"),
    Gpu("NVIDIA H100 NVL", "H100 NVL", 835, 94, 3900, False, "hopper", 4.176, (9, 0),
        "NVIDIA H100 datasheet (NVL): 835 dense BF16 per GPU (1671 with sparsity); price assumed = H100 PRO"),
    Gpu("NVIDIA H200", "H200 SXM", 989, 141, 4800, True, "hopper", 5.580, (9, 0),
        "NVIDIA H200 product page: 989 dense BF16 (1979 with sparsity)"),
    Gpu("NVIDIA B200", "B200", 2250, 180, 8000, True, "blackwell", 8.640, (10, 0),
        "NVIDIA HGX B200 specifications: 18 PFLOPS dense FP16/BF16 per 8 GPUs = 2250 per GPU"),
)
BY_NAME = {gpu.name: gpu for gpu in GPUS}
COUNTS = (1, 2, 4, 8)


def gpu_for(torch_name: str | None) -> Gpu | None:
    """The table's entry for a device name as torch reports it (exact, then ignoring case)."""
    if not torch_name:
        return None
    return BY_NAME.get(torch_name) or next((gpu for gpu in GPUS if gpu.name.lower() == torch_name.strip().lower()), None)


def prices(overrides: dict[str, float] | None) -> dict[str, float | None]:
    """Price per GPU-hour of every type: the published default, replaced by the operator's
    FINETUNE_GPU_PRICES (which may also name types, or `cpu`, that the table has no price for)."""
    found: dict[str, float | None] = {gpu.name: gpu.price_per_hour for gpu in GPUS}
    found.update(overrides or {})
    return found


def price_note(overrides: dict[str, float] | None) -> str:
    note = f"prices: {PRICES_SOURCE}, read {PRICES_READ}"
    if overrides:
        note += f"; the operator's FINETUNE_GPU_PRICES for {', '.join(sorted(overrides))}"
    return note + " (FINETUNE_GPU_PRICES to change)"


def selected(types: tuple[str, ...] | None) -> tuple[Gpu, ...]:
    """The types an endpoint estimates for: FINETUNE_GPU_TYPES, else every type in the table."""
    if not types:
        return GPUS
    wanted = {name.strip().lower() for name in types}
    return tuple(gpu for gpu in GPUS if gpu.name.lower() in wanted or gpu.short.lower() in wanted)
