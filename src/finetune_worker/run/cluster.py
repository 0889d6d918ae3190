"""One node's side of a cluster job, in the worker: what its rank children are told
(the spec, the nonce), and how the end of its torchrun is named (from the node's status
file, which the rank children write: run/cluster_rank.py)."""

from __future__ import annotations

import hashlib
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.host.children import ChildProcess, JsonLinesTail, shutdown_requested
from finetune_worker.host.failures import diagnose
from finetune_worker.host.rundir import RunPaths, checkpoint_step, checkpoints, is_complete_checkpoint, write_json
from finetune_worker.plan.children import CLUSTER_STATUS_FILE_ENV, build_torchrun_argv
from finetune_worker.plan.cluster import ClusterPlan
from finetune_worker.run.cluster_rank import PEER_LOST

SPEC_FILE = "cluster-spec.json"
STATUS_FILE = "cluster.jsonl"  # what the node's rank children say (run/cluster_rank.py)
# torchrun's static rendezvous when a node never came: node 0 waits for clients, the others
# time out connecting to node 0's store.
NEVER_JOINED = ("waiting for clients", "client socket has timed out", "Connection refused", "DistStoreError", "DistNetworkError")


def process_group_timeout(settings_timeout_s: int, config: dict) -> int:
    """How long any rank waits on a silent peer: the worker's setting, or the job's ddp_timeout when larger."""
    asked = config.get("ddp_timeout")
    return max(settings_timeout_s, int(asked)) if isinstance(asked, int) and not isinstance(asked, bool) else settings_timeout_s


def config_digest(config: dict, paths: RunPaths, cache_dir: Path) -> str:
    """The planned config with what is local to a node made equal (its output and data
    folders, its cache, the volume's runs; the resume point the nodes agree on later)."""
    text = yaml.safe_dump({key: value for key, value in config.items() if key != "resume_from_checkpoint"}, sort_keys=True)
    runs_dir = paths.run_dir.parent.parent
    for local, alias in ((paths.output_dir, "<output>"), (paths.data_dir, "<data>"), (cache_dir, "<cache>"), (runs_dir, "<runs>")):
        text = re.sub(re.escape(str(local)) + r"(?=/|$|[\s'\",\]}])", alias, text, flags=re.M)
    return hashlib.sha256(text.encode()).hexdigest()


def complete_steps(output_dir: Path, ranks: range) -> list[int]:
    """Checkpoints this node can resume from: complete, with the random state of each rank that writes here."""
    return [
        checkpoint_step(path) for path in checkpoints(output_dir)
        if is_complete_checkpoint(path)
        and (not any(path.glob("rng_state*.pth")) or all((path / f"rng_state_{rank}.pth").exists() for rank in ranks))  # save_only_model: none
    ]


def node_ranks(plan: ClusterPlan, shared_volume: bool) -> range:
    """The ranks whose files land in this node's output: all of them on a shared volume."""
    if shared_volume:
        return range(plan.world_size)
    first = plan.node_rank * plan.processes_per_node
    return range(first, first + plan.processes_per_node)


@dataclass(frozen=True)
class NodeFiles:
    """Where one node keeps what its torchrun needs: its own folder, the folder of every
    node's nonce, the training output and the config."""

    home: Path
    nodes_dir: Path
    output_dir: Path
    config_file: Path
    node_rank: int

    @classmethod
    def of_run(cls, paths: RunPaths) -> NodeFiles:
        return cls(paths.home, paths.nonce_file.parent, paths.output_dir, paths.config_file, paths.node)

    @property
    def status_file(self) -> Path:
        return self.home / STATUS_FILE


def prepare_launch(plan: ClusterPlan, files: NodeFiles, *, job_sha256: str, config_sha256: str, shared_volume: bool,
                   timeout_s: int, join_timeout_s: int, child_env: dict[str, str], train: bool = True) -> tuple[list[str], dict[str, str]]:
    """Write this node's nonce and spec, empty its status file; (torchrun argv, its environment).
    `train=False` (node 0 only): the run is trained already, and the other nodes learn it when they join."""
    files.nodes_dir.mkdir(parents=True, exist_ok=True)
    files.home.mkdir(parents=True, exist_ok=True)
    nonce = secrets.token_hex(16)
    (files.nodes_dir / f"node-{plan.node_rank}.nonce").write_text(nonce, encoding="utf-8")
    spec = {
        "node_rank": plan.node_rank, "processes_per_node": plan.processes_per_node, "shared_volume": shared_volume,
        "job_sha256": job_sha256, "config_sha256": config_sha256, "nonce": nonce, "timeout_s": timeout_s,
        "checkpoints": complete_steps(files.output_dir, node_ranks(plan, shared_volume)),
        "output_dir": str(files.output_dir), "nodes_dir": str(files.nodes_dir), "train": train,
    }
    spec_file = files.home / SPEC_FILE
    write_json(spec_file, spec)
    files.status_file.unlink(missing_ok=True)
    env = {**child_env, **plan.env, CLUSTER_STATUS_FILE_ENV: str(files.status_file), "AXOLOTL_NCCL_TIMEOUT": str(timeout_s)}
    return build_torchrun_argv(sys.executable, plan, files.config_file, spec_file, join_timeout_s), env


class NodeStatus:
    """The node's status file, read as it grows: the records so far (complete lines only)."""

    def __init__(self, files: NodeFiles):
        self.tail = JsonLinesTail(files.status_file)
        self.records: list[dict] = []

    def read_new(self) -> list[dict]:
        new = self.tail.read_new()
        self.records += new
        return new


def joined(records: list[dict]) -> dict | None:
    return next((record for record in records if record.get("kind") == "joined"), None)


def cluster_error(training: ChildProcess, records: list[dict], plan: ClusterPlan, join_timeout_s: int, timeout_s: int) -> JobError | None:
    """The cluster's own ends, named: the nodes disagreed, a node never joined, a node was
    lost. None: no cluster fault (a shutdown, or the training's own diagnosis, applies)."""
    log_tail = training.log_tail()
    if mismatch := next((record for record in records if record.get("kind") == "mismatch"), None):
        return JobError(errors.CLUSTER_MISMATCH, "the nodes do not agree, so none of them loaded anything: "
                        + "; ".join(mismatch["problems"]), details=list(mismatch["problems"]), log_tail=log_tail)
    if training.returncode == 0 or shutdown_requested():
        return None
    if joined(records) is None:
        if any(marker in line for line in log_tail for marker in NEVER_JOINED):
            return JobError(errors.RENDEZVOUS_TIMEOUT, f"not all {plan.nodes} nodes joined at {plan.endpoint} within {join_timeout_s} s "
                            "(FINETUNE_CLUSTER_JOIN_TIMEOUT): start `finetune-worker cluster JOB.json` on every node, with the "
                            "rendezvous address reachable from each", log_tail=log_tail)
        return None
    if diagnose(training.returncode, log_tail, "training", None).code != errors.TRAINING_FAILED:
        return None  # this node's own failure (out of memory, disk full, ...) is named as on one machine
    fault = next((record for record in records if record.get("kind") == "fault"), None)
    if fault or any(PEER_LOST.search(line) for line in log_tail):
        detail = f" ({fault['detail'][:200]})" if fault else ""
        return JobError(errors.NODE_LOST, f"another node of the cluster died or stopped answering (within {timeout_s} s, "
                        f"FINETUNE_CLUSTER_TIMEOUT){detail}; run the same command on every node to resume from the last "
                        "checkpoint complete on all of them", log_tail=log_tail)
    return None
