"""What the worker's machine can do, detected once per job and passed around as data."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Hardware:
    gpu_count: int = 0
    gpu_names: tuple[str, ...] = ()
    gpu_memory_bytes: tuple[int, ...] = ()
    bf16: bool = False
    compute_capability: tuple[int, int] | None = None
    cpu_count: int = 1
    notes: tuple[str, ...] = field(default=())

    @property
    def has_gpu(self) -> bool:
        return self.gpu_count > 0

    def describe(self) -> str:
        if not self.has_gpu:
            return f"CPU only ({self.cpu_count} cores)"
        gib = self.gpu_memory_bytes[0] / 2**30 if self.gpu_memory_bytes else 0
        return f"{self.gpu_count} x {self.gpu_names[0]} ({gib:.0f} GiB)"


CPU_ONLY = Hardware()
# Where a GPU shows itself to a container without torch: the NVIDIA driver, its device
# nodes, or ROCm's kernel driver.
GPU_SIGNS = (Path("/proc/driver/nvidia"), Path("/dev/nvidiactl"), Path("/dev/kfd"))


def no_gpu_driver() -> bool:
    """No GPU driver on this machine: a CPU machine, known without importing torch (seconds)."""
    return not any(sign.exists() for sign in GPU_SIGNS) and not any(Path("/dev").glob("nvidia[0-9]*"))


def detect_hardware() -> Hardware:
    cpus = os.cpu_count() or 1
    if no_gpu_driver():
        return Hardware(cpu_count=cpus)
    import torch

    if not torch.cuda.is_available():
        return Hardware(cpu_count=cpus)
    count = torch.cuda.device_count()
    props = [torch.cuda.get_device_properties(i) for i in range(count)]
    return Hardware(
        gpu_count=count,
        gpu_names=tuple(p.name for p in props),
        gpu_memory_bytes=tuple(p.total_memory for p in props),
        bf16=torch.cuda.is_bf16_supported(),
        compute_capability=(props[0].major, props[0].minor),
        cpu_count=cpus,
    )


def peak_gpu_memory() -> dict[str, int]:
    """The most GPU memory PyTorch's allocator held on this process's GPU so far, in bytes
    (max_memory_reserved: what the memory estimate is compared with); {} without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_memory_reserved": int(torch.cuda.max_memory_reserved()), "peak_memory_allocated": int(torch.cuda.max_memory_allocated())}


def ranks_in_group() -> int:
    """How many processes torch.distributed's process group has (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def peaks_of_every_rank(peaks: dict[str, int]) -> dict:
    """Every rank's peaks, gathered (a collective: every rank of the process group calls it):
    the largest of each (what has to fit on every GPU) and the list by rank. One process,
    or no process group: its own peaks."""
    if not peaks or ranks_in_group() < 2:
        return peaks
    import torch.distributed as dist

    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, peaks)
    return {**{name: max(int(rank.get(name) or 0) for rank in every) for name in peaks},
            "peak_memory_per_rank": [{"rank": index, **rank} for index, rank in enumerate(every)]}


def any_rank(flag: bool, device) -> bool:
    """Whether any rank of the process group says `flag` (a collective: every rank calls it
    at the same point); without a process group, `flag` itself."""
    if ranks_in_group() < 2:
        return flag
    import torch
    import torch.distributed as dist

    said = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(said, op=dist.ReduceOp.MAX)
    return bool(said.item())


def wait_for_every_rank() -> None:
    """A barrier across the process group, if there is one."""
    if ranks_in_group() > 1:
        import torch.distributed as dist

        dist.barrier()
