"""One training process of a cluster: what torchrun starts on every node, once per GPU.

    python -m finetune_worker.run.cluster_rank CONFIG --spec SPEC

Before Axolotl is imported it dies with its torchrun agent (torchrun starts workers in
their own session, so nothing else would end them), opens the process group with the
worker's timeout, and makes every node agree: the same job and config, the same stack,
the storage every node claims, and the checkpoint to resume from. A node that disagrees
makes every node refuse with the same list of problems, before any model, tokenizer or
dataset loads. Then it runs exactly what `axolotl train CONFIG` runs.

What the node's parent needs to name the end goes, as JSON lines, into the node's status
file (FINETUNE_CLUSTER_STATUS_FILE), written by each node's local rank 0:
{"kind": "joined", ...}, {"kind": "mismatch", "problems": [...]}, {"kind": "fault", "detail": ...},
{"kind": "nothing_to_train"} (node 0 already trained this run);
and every rank's {"kind": "pid", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from finetune_worker.host.children import die_with_parent
from finetune_worker.host.fastexit import exit_without_teardown
from finetune_worker.plan.children import CLUSTER_STATUS_FILE_ENV, CLUSTER_TRAINING_ARGS_ENV

MISMATCH_EXIT = 5
FAULT_EXIT = 6
STACK = ("torch", "axolotl", "transformers", "accelerate", "peft", "finetune-worker")
# What gloo and NCCL raise in the survivors when a peer dies or goes silent.
PEER_LOST = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Timed out waiting \d+ms for (recv|send)|"
    r"DistNetworkError|DistBackendError|Watchdog caught collective operation timeout|NCCL communicator was aborted|"
    r"remote worker crashing|ncclRemoteError|ncclSystemError",
    re.I,
)


def stack_versions() -> dict[str, str]:
    """The versions every node must share (read without importing the packages)."""
    found = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in STACK:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def node_problems(payloads: Sequence[dict]) -> list[str]:
    """Everything the nodes disagree on, each named against node 0 (pure; every rank
    computes the same list from the same gathered payloads)."""
    first, problems = payloads[0], []
    for payload in payloads[1:]:
        node = f"node {payload['node_rank']}"
        if payload["job_sha256"] != first["job_sha256"]:
            problems.append(f"{node} was given another job than node 0 (job.json digests differ): send the same job to every node")
        elif payload["config_sha256"] != first["config_sha256"] and first["train"]:
            problems.append(f"{node} planned another Axolotl config than node 0 (config.yaml digests differ; its GPUs or worker settings differ)")
        for name, version in first["versions"].items():
            if payload["versions"].get(name) != version:
                problems.append(f"{node} runs {name} {payload['versions'].get(name)}, node 0 runs {version}: use the same image on every node")
        if payload["processes_per_node"] != first["processes_per_node"]:
            problems.append(f"{node} runs {payload['processes_per_node']} processes, node 0 runs {first['processes_per_node']}")
        if payload["shared_volume"] != first["shared_volume"]:
            problems.append(f"{node} has FINETUNE_SHARED_VOLUME={int(payload['shared_volume'])}, node 0 has {int(first['shared_volume'])}")
    problems += _storage_problems(payloads)
    return list(dict.fromkeys(problems))


def _storage_problems(payloads: Sequence[dict]) -> list[str]:
    """A shared volume must be seen by every node (each reads every node's nonce), and
    separate volumes must really be separate (two nodes writing one run directory)."""
    problems = []
    ranks = [payload["node_rank"] for payload in payloads]
    for payload in payloads:
        seen = set(payload["seen"])
        if payload["shared_volume"] and seen != set(ranks):
            missing = ", ".join(str(rank) for rank in ranks if rank not in seen)
            problems.append(f"FINETUNE_SHARED_VOLUME=1, but node {payload['node_rank']} cannot see the run directory of node(s) {missing}: "
                            "attach the same volume to every node at the same BASE_VOLUME, or unset FINETUNE_SHARED_VOLUME")
        elif not payload["shared_volume"] and seen - {payload["node_rank"]}:
            problems.append(f"node {payload['node_rank']} sees the run directory of another node, so the nodes share a volume: "
                            "set FINETUNE_SHARED_VOLUME=1 on every node (else they would write one run directory twice)")
    return problems


def agreed_resume_step(payloads: Sequence[dict]) -> int | None:
    """The newest checkpoint complete on every node that keeps one (on a shared volume,
    node 0's view is everybody's); None: train from the start."""
    first = payloads[0]
    if first["shared_volume"]:
        steps = set(first["checkpoints"])
    else:
        steps = set.intersection(*(set(payload["checkpoints"]) for payload in payloads))
    return max(steps) if steps else None


def _status(kind: str, **fields) -> None:
    path = os.environ.get(CLUSTER_STATUS_FILE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"kind": kind, "time": time.time(), **fields}) + "\n")


def _seen_nodes(spec: dict, payloads: Sequence[dict]) -> list[int]:
    """The nodes whose nonce this node reads in its own run directory's nodes/ folder."""
    nodes_dir = Path(spec["nodes_dir"])
    seen = []
    for payload in payloads:
        try:
            if (nodes_dir / f"node-{payload['node_rank']}.nonce").read_text(encoding="utf-8").strip() == payload["nonce"]:
                seen.append(payload["node_rank"])
        except OSError:
            continue
    return seen


def _join(spec: dict):
    """The process group over every rank of every node, bounded by the worker's timeout."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo", timeout=timedelta(seconds=spec["timeout_s"]))
    return dist, cuda


def agree(spec: dict, dist) -> tuple[list[str], int | None, bool]:
    """Gather every node's payload, then every node's view of the others' run directories."""
    mine = {key: spec[key] for key in ("node_rank", "job_sha256", "config_sha256", "processes_per_node", "shared_volume",
                                        "checkpoints", "nonce", "train")} | {"versions": stack_versions()}
    payloads = [None] * dist.get_world_size()
    dist.all_gather_object(payloads, mine)
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, _seen_nodes(spec, payloads))
    by_node = {}
    for payload, sees in zip(payloads, seen, strict=True):
        by_node.setdefault(payload["node_rank"], payload | {"seen": sees})
    ordered = [by_node[rank] for rank in sorted(by_node)]
    problems = node_problems(ordered)
    return problems, (None if problems else agreed_resume_step(ordered)), ordered[0]["train"]


def _train(config: Path, resume: Path | None) -> None:
    """What `python -m axolotl.cli.train CONFIG` runs, resuming where the nodes agreed."""
    os.chdir(config.parent)
    import fire
    from axolotl.cli.train import do_cli

    sys.argv = ["axolotl.cli.train", str(config)]
    fire.Fire(do_cli, command=[str(config), *([f"--resume_from_checkpoint={resume}"] if resume else [])])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_worker.run.cluster_rank")
    parser.add_argument("config", type=Path)
    parser.add_argument("--spec", type=Path, required=True)
    options = parser.parse_args(argv)
    agent = os.getppid()  # torchrun's agent; it may itself be PID 1 (a container's command)
    die_with_parent()
    if os.getppid() != agent:  # the agent died before the death signal was armed
        return FAULT_EXIT
    spec = json.loads(options.spec.read_text(encoding="utf-8"))
    local_main = os.environ.get("LOCAL_RANK", "0") == "0"
    _status("pid", rank=int(os.environ.get("RANK", "0")), pid=os.getpid())
    dist, cuda = _join(spec)
    problems, step, train = agree(spec, dist)
    if problems:
        if local_main:
            _status("mismatch", problems=problems)
        return MISMATCH_EXIT
    if not train:  # node 0 holds this run's finished training: every node is done
        if local_main:
            _status("nothing_to_train")
        return 0
    if local_main:
        _status("joined", world_size=dist.get_world_size(), resume_step=step)
    # Axolotl's and the Trainer's accelerate states then find a distributed one (on CPU: gloo,
    # not a lone process): Axolotl resets the state before the Trainer's Accelerator reads the
    # environment again, so the CPU flag goes there too.
    if not cuda:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    from accelerate import PartialState

    PartialState(cpu=not cuda)
    os.environ[CLUSTER_TRAINING_ARGS_ENV] = json.dumps({"use_cpu": not cuda, "save_on_each_node": not spec["shared_volume"],
                                                "ddp_timeout": spec["timeout_s"]})
    resume = Path(spec["output_dir"]) / f"checkpoint-{step}" if step is not None else None
    try:
        _train(options.config, resume)
    except Exception as exc:  # noqa: BLE001 - a lost peer is named; anything else is re-raised as it was
        if not PEER_LOST.search(f"{type(exc).__name__}: {exc}"):
            raise
        if local_main:
            _status("fault", detail=f"{type(exc).__name__}: {str(exc)[:500]}")
        print(f"\n[finetune-worker] rank {os.environ.get('RANK')}: lost a peer: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return FAULT_EXIT
    return 0


if __name__ == "__main__":
    exit_without_teardown(main(sys.argv[1:]))
