"""Two nodes of a cluster, simulated as two separate process trees on loopback.

Each node is its own `finetune-worker cluster JOB.json --json` (its own session), with
the plain torchrun variables a cluster sets (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
NPROC_PER_NODE), one training process on gloo, the tiny model. The cluster's timeouts are
seconds here (minutes by default).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_job, tiny_args
from finetune_worker.host.rundir import is_complete_checkpoint
from finetune_worker.host.tools import free_port
from test_canary import HF_CANARY, ArgvWatcher, assert_clean_text, assert_clean_tree

pytestmark = [pytest.mark.training, pytest.mark.cluster]

JOIN_TIMEOUT_S = 45  # both nodes validate (importing Axolotl) before they launch torchrun: room for one to lag
NEVER_JOINS_TIMEOUT_S = 6  # the test where a node never comes waits this long
CLUSTER_TIMEOUT_S = 60  # a silent peer; a killed one is seen in seconds (its sockets close)


class Node:
    """One node: a `finetune-worker cluster` process tree of its own, its events read back."""

    def __init__(self, rank: int, job: dict, volume: Path, port: int, work: Path, assets: Path, join_timeout_s: int = JOIN_TIMEOUT_S,
                 **settings: str):
        self.rank, self.volume = rank, volume
        job_file = work / f"job-node-{rank}.json"
        job_file.write_text(json.dumps(job))
        env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_TOKEN", "WANDB"))}
        # The tiny model and data are the worker's bundled files on every node (same path on each, as in an image).
        env.update(BASE_VOLUME=str(volume), FINETUNE_EXAMPLES_DIR=str(assets), HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", NNODES="2", NODE_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC_PER_NODE="1",
                   FINETUNE_CLUSTER_JOIN_TIMEOUT=str(join_timeout_s), FINETUNE_CLUSTER_TIMEOUT=str(CLUSTER_TIMEOUT_S), **settings)
        self.out = work / f"node-{rank}.out"
        self.started = time.monotonic()
        with open(self.out, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "finetune_worker.entry.cli", "cluster", str(job_file), "--json"],
                                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 300) -> list[dict]:
        self.process.wait(timeout=timeout)
        self.ended = time.monotonic()
        return self.events()

    def events(self) -> list[dict]:
        found = []
        for line in self.out.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found

    def kill_tree(self) -> None:
        """The machine is gone: every process of this node, at once."""
        os.killpg(self.process.pid, signal.SIGKILL)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)

    def pids(self) -> list[int]:
        """The node's training processes, as its rank children recorded them."""
        status = self.home() / "cluster.jsonl"
        if not status.is_file():
            return []
        return [json.loads(line)["pid"] for line in status.read_text().splitlines() if '"pid"' in line]

    def home(self) -> Path:
        job = json.loads((self.out.parent / f"job-node-{self.rank}.json").read_text())
        run_dir = self.volume / "runs" / job["user_id"] / job["run_id"]
        return run_dir if self.rank == 0 else run_dir / "nodes" / f"node-{self.rank}"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def two_nodes(job: dict, volumes: tuple[Path, Path], work: Path, assets: Path, jobs: tuple[dict, dict] | None = None,
              **settings: str) -> tuple[Node, Node]:
    port = free_port()
    first, second = jobs or (job, job)
    return Node(0, first, volumes[0], port, work, assets, **settings), Node(1, second, volumes[1], port, work, assets, **settings)


def cluster_args(tiny: Path, **overrides) -> dict:
    return tiny_args(tiny, **{"num_epochs": 2, **overrides})


def test_nodes_given_different_jobs_both_refuse_before_anything_loads(tiny, tmp_path):
    job = make_job(cluster_args(tiny), credentials={"hf_token": HF_CANARY})
    other = {**job, "args": {**job["args"], "learning_rate": 0.001}}
    with ArgvWatcher() as argv:
        nodes = two_nodes(job, (tmp_path / "v0", tmp_path / "v1"), tmp_path, tiny, jobs=(job, other))
        for node in nodes:
            node.wait()
    assert argv.scans > 10 and argv.hits == []  # torchrun's and the rank children's command lines too
    for node in nodes:
        assert_clean_text(node.out.read_text(), f"node {node.rank}'s output")
        assert_clean_tree(node.volume)  # job.json, config.yaml, the spec, the status file, the nonce, the log
        final = node.events()[-1]
        assert final["type"] == "error" and final["code"] == "cluster_mismatch", final
        assert "node 1 was given another job than node 0" in final["message"]
        assert node.process.returncode != 0
        log = (node.home() / "train.log").read_text()
        assert "training started" not in log and "Loading" not in log  # no model, tokenizer or dataset loaded
        assert not any(alive(pid) for pid in node.pids())


def test_a_node_that_never_starts_ends_the_other_with_rendezvous_timeout(tiny, tmp_path):
    job = make_job(cluster_args(tiny))
    node = Node(0, job, tmp_path / "v0", free_port(), tmp_path, tiny, join_timeout_s=NEVER_JOINS_TIMEOUT_S)
    final = node.wait()[-1]
    assert final["type"] == "error" and final["code"] == "rendezvous_timeout", final
    assert "not all 2 nodes joined" in final["message"]
    joining = next(e for e in node.events() if e.get("cluster"))
    assert joining["cluster"]["world_size"] == 2 and joining["cluster"]["rendezvous"].startswith("127.0.0.1:")
    assert not any(alive(pid) for pid in node.pids())


def test_two_nodes_on_one_shared_volume_train_one_run_with_ddp(tiny_sentencepiece, tmp_path):
    # the untrained tiny model: its loss has somewhere to fall in 18 steps
    volume, assets = tmp_path / "shared", tiny_sentencepiece
    job = make_job(cluster_args(assets, num_epochs=4), credentials={"hf_token": HF_CANARY})
    run_dir = volume / "runs" / job["user_id"] / job["run_id"]

    # first with a budget the job's own start already spends: node 0 keeps the pace, and every
    # rank stops at the same checkpoint (the one a rank saw the request at is every rank's)
    budgeted = {**job, "max_hours": 0.004}
    first, second = two_nodes(budgeted, (volume, volume), tmp_path, assets, FINETUNE_SHARED_VOLUME="1")
    stopped, other = first.wait(), second.wait()
    assert stopped[-1]["type"] == "error" and stopped[-1]["code"] == "budget_exceeded", stopped[-3:]
    assert other[-1]["type"] == "error" and other[-1]["code"] == "budget_exceeded" and "node 0" in other[-1]["message"], other[-3:]
    kept = sorted(run_dir.glob("output/checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert kept and is_complete_checkpoint(kept[-1]), kept
    first_loss = next(e["loss"] for e in stopped if e["type"] == "progress")

    # relaunched without it: every node resumes from that checkpoint and the run ends
    first, second = two_nodes(job, (volume, volume), tmp_path, assets, FINETUNE_SHARED_VOLUME="1")
    events, other = first.wait(), second.wait()
    result = events[-1]
    assert result["type"] == "result", result
    assert [e["resumed_from_step"] for e in events if e.get("resumed_from_step")][:1] == [int(kept[-1].name.split("-")[1])]
    # 36 rows x 4 epochs, micro batch 4 on each of 2 ranks: 18 steps, with both ranks in one DDP group
    assert result["metrics"]["total_steps"] == 18
    assert result["cluster"] == {"platform": "torchrun", "nodes": 2, "node_rank": 0, "processes_per_node": 1, "world_size": 2,
                                 "rendezvous": result["cluster"]["rendezvous"], "shared_volume": True}
    begin = next(json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines() if '"train_begin"' in line)
    assert begin["world_size"] == 2 and begin["parallel_mode"] == "distributed"
    assert result["metrics"]["final_loss"] < first_loss - 0.2, (first_loss, result["metrics"])
    # each step's record comes before the all-reduce that ends it, its log after: the event waits for the loss
    assert all(e["loss"] is not None for e in stopped + events if e["type"] == "progress"), stopped + events
    assert (run_dir / "result.json").is_file() and (run_dir / "output" / "adapter_model.safetensors").is_file()
    assert other[-1]["type"] == "result" and other[-1]["node_rank"] == 1 and second.process.returncode == 0
    node_dir = run_dir / "nodes" / "node-1"
    assert (node_dir / "events.jsonl").is_file() and (node_dir / "train.log").is_file() and not (node_dir / "result.json").exists()
    assert "rank 1 of 2: training finished" in (node_dir / "train.log").read_text()
    assert "node_lost" not in (run_dir / "events.jsonl").read_text()
    assert_clean_tree(volume)  # both nodes' files, the checkpoints and the output
    for node in (first, second):
        assert_clean_text(node.out.read_text(), f"node {node.rank}'s output")

    # relaunched after it finished: node 0 answers with the stored result, node 1 learns it at once
    first, second = two_nodes(job, (volume, volume), tmp_path, assets, FINETUNE_SHARED_VOLUME="1")
    again, other = first.wait(timeout=120), second.wait(timeout=120)
    assert again[-1]["type"] == "result" and again[-1].get("reused") is True, again[-3:]
    assert other[-1]["type"] == "result" and any("nothing to train on this node" in e.get("message", "") for e in other), other[-3:]


def test_separate_volumes_a_lost_node_ends_the_run_and_a_relaunch_resumes(tiny, tmp_path):
    volumes = (tmp_path / "v0", tmp_path / "v1")
    job = make_job(cluster_args(tiny, save_steps=2, num_epochs=3))
    first, second = two_nodes(job, volumes, tmp_path, tiny)
    output = [volume / "runs" / job["user_id"] / job["run_id"] / "output" for volume in volumes]
    deadline = time.monotonic() + 240
    while not all(is_complete_checkpoint(out / "checkpoint-4") for out in output):
        assert time.monotonic() < deadline and first.process.poll() is None, first.events()[-3:]
        time.sleep(0.2)
    second.kill_tree()
    killed = time.monotonic()
    final = first.wait(timeout=CLUSTER_TIMEOUT_S + 60)[-1]
    assert final["type"] == "error" and final["code"] == "node_lost", final
    assert first.ended - killed < 30  # a killed peer closes its sockets: seen in seconds, well within T
    assert not any(alive(pid) for node in (first, second) for pid in node.pids())
    assert is_complete_checkpoint(output[0] / "checkpoint-4")

    first, second = two_nodes(job, volumes, tmp_path, tiny)
    events, other = first.wait(), second.wait()
    assert events[-1]["type"] == "result", events[-3:]
    resumed = [e.get("resumed_from_step") for e in events if e.get("resumed_from_step")]
    assert resumed and resumed[0] >= 4
    assert events[-1]["metrics"]["total_steps"] == 14  # 36 rows x 3 epochs / (4 x 2 ranks)
    assert other[-1]["type"] == "result" and not (volumes[1] / "runs" / job["user_id"] / job["run_id"] / "result.json").exists()
