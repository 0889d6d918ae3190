"""The error codes of the job contract and the exception that carries them."""

from __future__ import annotations

from dataclasses import dataclass, field

INVALID_INPUT = "invalid_input"
INVALID_CONFIG = "invalid_config"
DATASET_ERROR = "dataset_error"
MODEL_LOAD_ERROR = "model_load_error"
AUTH_ERROR = "auth_error"
OUT_OF_MEMORY = "out_of_memory"
NAN_LOSS = "nan_loss"
DISK_FULL = "disk_full"
DISK_QUOTA = "disk_quota"  # the run directory reached the operator's FINETUNE_MAX_RUN_BYTES
TRAINING_FAILED = "training_failed"
CANCELLED = "cancelled"
RUN_IN_PROGRESS = "run_in_progress"
RUN_NOT_FOUND = "run_not_found"
PUSH_FAILED = "push_failed"
DEADLINE_EXCEEDED = "deadline_exceeded"  # a child (or the whole job) ran past its wall-clock limit
EXPORT_FAILED = "export_failed"
BUDGET_EXCEEDED = "budget_exceeded"  # the job's max_cost / max_hours (or the operator's cap): estimated or measured over it
STORAGE_ERROR = "storage_error"  # the S3-compatible destination refused, or an upload kept failing
INTERNAL_ERROR = "internal_error"
# A cluster (finetune-worker cluster, several nodes): see docs/operating.md "Clusters".
RENDEZVOUS_TIMEOUT = "rendezvous_timeout"  # not every node joined within FINETUNE_CLUSTER_JOIN_TIMEOUT
NODE_LOST = "node_lost"  # a node died or went silent during the run (FINETUNE_CLUSTER_TIMEOUT)
CLUSTER_MISMATCH = "cluster_mismatch"  # the nodes were given different jobs, stacks or storage


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where it is, what is wrong and the fix."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass
class JobError(Exception):
    """Ends a job with an `error` event. `message` is safe to show a client."""

    code: str
    message: str
    details: list[str] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def run_not_found(user_id: str, run_id: str) -> JobError:
    # The same words for a run of another user and for one that never was.
    return JobError(RUN_NOT_FOUND, f"user {user_id!r} has no run {run_id!r} on this volume")


def problems_error(code: str, problems: list[Problem]) -> JobError:
    count = len(problems)
    noun = "problem" if count == 1 else "problems"
    return JobError(code, f"{count} {noun} in the job input", [str(p) for p in problems])
