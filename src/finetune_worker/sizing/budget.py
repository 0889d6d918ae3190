"""A job's budget: its `max_cost` (US dollars) and `max_hours`, each capped by the operator's
FINETUNE_MAX_COST and FINETUNE_MAX_HOURS, against what this worker costs per hour.

Checked twice: before anything downloads, against the estimate for this worker's GPU type
and count (sizing/estimate.py); during training, against the measured pace (the time the
job has taken so far plus the training's ETA). A CPU worker has no row in the estimate's
table, so there only the measured pace counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_worker.contract.errors import Problem
from finetune_worker.contract.job import JobInput
from finetune_worker.contract.settings import WorkerSettings
from finetune_worker.host.hardware import Hardware
from finetune_worker.sizing import gpus

CPU_PRICE_KEY = "cpu"  # FINETUNE_GPU_PRICES's entry for a worker without a GPU


@dataclass(frozen=True)
class Budget:
    max_cost: float | None  # US dollars
    max_seconds: float | None
    price_per_hour: float | None  # this worker: every GPU it has (or its CPU), per hour
    said: str  # "max_cost $2 (the job's), max_hours 1 (FINETUNE_MAX_HOURS)"

    def cost(self, seconds: float) -> float | None:
        return None if self.price_per_hour is None else seconds * self.price_per_hour / 3600

    def overrun(self, seconds: float) -> str | None:
        """Why a job taking `seconds` in all would break the budget, or None."""
        reasons = []
        if self.max_seconds is not None and seconds > self.max_seconds:
            reasons.append(f"{seconds / 3600:.3g} h, over max_hours {self.max_seconds / 3600:g}")
        cost = self.cost(seconds)
        if self.max_cost is not None and cost is not None and cost > self.max_cost:
            reasons.append(f"${cost:.4g} at ${self.price_per_hour:g} an hour, over max_cost ${self.max_cost:g}")
        return " and ".join(reasons) or None


def worker_price(settings: WorkerSettings, hardware: Hardware, nodes: int = 1) -> float | None:
    """What this worker costs per hour: its GPUs' price (FINETUNE_GPU_PRICES over the published
    defaults) times their number, or FINETUNE_GPU_PRICES's `cpu` entry on a CPU worker; on a
    cluster, times its nodes (all alike)."""
    price = _machine_price(settings, hardware)
    return None if price is None else price * nodes


def _machine_price(settings: WorkerSettings, hardware: Hardware) -> float | None:
    if not hardware.has_gpu:
        return settings.gpu_prices.get(CPU_PRICE_KEY)
    known = gpus.gpu_for(hardware.gpu_names[0])
    table = gpus.prices(settings.gpu_prices)
    price = table.get(known.name if known else hardware.gpu_names[0])
    return None if price is None else price * hardware.gpu_count


def job_budget(job: JobInput, settings: WorkerSettings, hardware: Hardware, nodes: int = 1) -> tuple[Budget | None, list[Problem]]:
    """The job's budget (None without one), or why it cannot be kept on this worker (on a
    cluster: `nodes` machines like this one, every one paid for)."""
    costs = [(value, who) for value, who in ((job.max_cost, "the job's"), (settings.max_cost, "FINETUNE_MAX_COST")) if value is not None]
    hours = [(value, who) for value, who in ((job.max_hours, "the job's"), (settings.max_hours, "FINETUNE_MAX_HOURS")) if value is not None]
    if job.max_cost is None and job.max_hours is None and settings.max_cost is None:
        return None, []  # FINETUNE_MAX_HOURS alone stays the job's deadline (host/resources.py)
    cost, hour = min(costs, default=None), min(hours, default=None)
    price = worker_price(settings, hardware, nodes)
    if cost is not None and price is None:
        what = f"its GPU type ({hardware.gpu_names[0]})" if hardware.has_gpu else f"a CPU worker (FINETUNE_GPU_PRICES's {CPU_PRICE_KEY!r})"
        field = "max_cost" if job.max_cost is not None else "FINETUNE_MAX_COST"
        return None, [Problem(field, f"this worker has no price for {what}, so a cost cannot be kept; the operator sets it in "
                              "FINETUNE_GPU_PRICES, or use max_hours")]
    said = ", ".join([*([f"max_cost ${cost[0]:g} ({cost[1]})"] if cost else []), *([f"max_hours {hour[0]:g} ({hour[1]})"] if hour else [])])
    return Budget(cost[0] if cost else None, hour[0] * 3600 if hour else None, price, said), []


def estimate_row_for(table: dict, hardware: Hardware, count: int | None = None) -> dict | None:
    """The estimate's row for this worker's GPU type and `count` (its GPUs; a cluster's: every
    node's), None on a CPU, or for a type the table lacks."""
    known = gpus.gpu_for(hardware.gpu_names[0]) if hardware.has_gpu else None
    if known is None:
        return None
    count = count or hardware.gpu_count
    return next((row for row in table.get("rows", []) if row["gpu"] == known.name and row["count"] == count), None)
