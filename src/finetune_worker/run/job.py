"""What a job's stages learn, in order: the one object each stage reads and adds to.

The live side of the job (its lock, its child processes, its redactor) is the
`JobResources` (host/resources.py); no field is in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_worker.checks.tenancy import HubWrites, WandbTarget
from finetune_worker.checks.validation import ValidJob
from finetune_worker.contract.job import JobInput
from finetune_worker.contract.settings import WorkerSettings
from finetune_worker.data.files import DatasetCheck
from finetune_worker.host.hardware import Hardware
from finetune_worker.host.rundir import PreviousRun, RunPaths
from finetune_worker.plan.cluster import ClusterPlan
from finetune_worker.plan.config import AxolotlPlan
from finetune_worker.sizing.resources import ModelFacts


@dataclass
class JobRun:
    """The job as its stages learn it; each stage reads what the ones before it set."""

    raw_input: Any
    env: dict[str, str]
    hardware: Hardware | None
    started: float  # time.monotonic() when the worker took the job
    launch: str = "machine"  # "cluster": one node of a multi-node cluster (finetune-worker cluster)
    cluster: ClusterPlan | None = None  # several nodes: this node's place among them
    done: bool = False  # a stage answered the job (a stored result, a preflight)
    settings: WorkerSettings | None = None
    parsed: JobInput | None = None  # the request, parsed (before its args are checked)
    parse_problems: list = field(default_factory=list)
    valid: ValidJob | None = None
    paths: RunPaths | None = None
    child_env: dict[str, str] = field(default_factory=dict)
    wandb_key: str | None = None
    hub_writes: HubWrites = field(default_factory=lambda: HubWrites({}))
    wandb: WandbTarget = field(default_factory=WandbTarget)
    estimate_config: dict | None = None  # the config as planned for a GPU, for the time and cost table (not on this machine)
    plan: AxolotlPlan | None = None  # complete (fast defaults, prepared-data path, resume point) before config.yaml is written
    processes: int = 1
    base: ModelFacts | None = None
    previous: PreviousRun | None = None
    checks: list[DatasetCheck] = field(default_factory=list)
    trained: dict | None = None
    has_curve: bool = False
    evaluation: dict | None = None
    publish_blocked: str | None = None
    merged: Path | None = None
    gguf: list[str] | None = None
    hub: dict | None = None
    bucket: Any = None  # run/storage.Bucket: where the run is kept besides the volume (None: the volume only)
    uploads: Any = None  # run/storage.CheckpointUploads while training
    stored: dict | None = None  # what the outputs' upload sent
    budget: Any = None  # sizing/budget.Budget: the job's max_cost / max_hours (None: no budget)
    estimate_row: dict | None = None  # the estimate for this worker's GPU type and count (budget check, or the table at training start)
    stage_seconds: dict = field(default_factory=dict)  # how long each stage of the spine took

    @property
    def job(self) -> JobInput:
        return self.valid.job

    @property
    def world_size(self) -> int:
        """Training processes over every node: what sharding and the memory estimate divide by."""
        return self.cluster.world_size if self.cluster is not None else self.processes

    @property
    def secondary(self) -> bool:
        """A node other than node 0 of a cluster: it trains, and leaves reporting and publishing to node 0."""
        return self.cluster is not None and not self.cluster.primary

    @property
    def repo_id(self) -> str | None:
        return self.plan.publish.get("hub_model_id")
