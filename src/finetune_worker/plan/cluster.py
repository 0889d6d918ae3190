"""Which multi-node cluster this worker runs on, read from the variables its platform sets.

Each platform is found by one marker variable, first found wins:

- RunPod Instant Clusters (`PRIMARY_ADDR`): PRIMARY_ADDR/PRIMARY_PORT, NODE_RANK, NUM_NODES,
  NUM_TRAINERS, WORLD_SIZE, and the advice to keep NCCL on the `ens1` interface;
  https://docs.runpod.io/instant-clusters/configuration
- dstack (`DSTACK_MASTER_NODE_IP`): DSTACK_NODES_NUM, DSTACK_NODE_RANK, DSTACK_GPUS_PER_NODE,
  DSTACK_GPUS_NUM, DSTACK_NODES_IPS; https://dstack.ai/docs/reference/environment-variables/
- SkyPilot (`SKYPILOT_NODE_IPS`): SKYPILOT_NUM_NODES, SKYPILOT_NODE_RANK, SKYPILOT_NUM_GPUS_PER_NODE;
  https://docs.skypilot.co/en/latest/running-jobs/distributed-jobs.html
- plain torchrun (`NNODES`): NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR/MASTER_PORT, the names of
  torchrun's --nnodes/--node-rank/--nproc-per-node/--master-addr/--master-port;
  https://docs.pytorch.org/docs/stable/elastic/run.html

RunPod's nodes also carry MASTER_ADDR/MASTER_PORT/WORLD_SIZE; only NNODES means plain torchrun.
One node (or no marker) is no cluster: the worker trains as it does on one machine.
Pure: the caller passes the environment and the GPU count.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from finetune_worker.contract.errors import Problem

MAX_NODES = 64
DEFAULT_PORT = 29500
HIGHEST_PORT = 65535
RUNPOD_CHILD_ENV = {"NCCL_SOCKET_IFNAME": "ens1", "GLOO_SOCKET_IFNAME": "ens1"}
# A failed collective on one node then ends the job instead of hanging every node until the timeout.
ALWAYS_CHILD_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
_WHOLE_NUMBER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class ClusterPlan:
    """Where this node stands in a multi-node training, and what its training children need."""

    platform: str
    nodes: int
    node_rank: int
    processes_per_node: int
    host: str
    port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    @property
    def primary(self) -> bool:
        return self.node_rank == 0

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def describe(self) -> str:
        return f"{_counted(self.nodes, 'node')} x {_counted(self.processes_per_node, 'process')} (world size {self.world_size})"

    def record(self) -> dict:
        return {
            "platform": self.platform,
            "nodes": self.nodes,
            "node_rank": self.node_rank,
            "processes_per_node": self.processes_per_node,
            "world_size": self.world_size,
            "rendezvous": self.endpoint,
        }


def _counted(count: int, word: str) -> str:
    plural = word + ("es" if word.endswith("s") else "s")
    return f"{count} {word if count == 1 else plural}"


@dataclass(frozen=True)
class _Found:
    """One platform's values as read; None where a variable was missing or malformed."""

    platform: str
    nodes: int | None
    nodes_variable: str
    rank: int | None
    processes: int | None
    processes_variable: str
    host: str | None
    port: int | None
    child_env: Mapping[str, str]


class _Reader:
    """Reads one platform's variables, keeping a Problem for each bad one instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str], platform: str):
        self.env = env
        self.platform = platform
        self.problems: list[Problem] = []

    def refuse(self, name: str, message: str) -> None:
        self.problems.append(Problem(name, message))

    def required(self, name: str) -> str | None:
        if name not in self.env:
            self.refuse(name, f"{name} is not set; {self.platform} sets it on every node of a cluster (set it when starting the worker by hand)")
            return None
        return self.env[name]

    def whole(self, name: str, value: str | None) -> int | None:
        if value is None:
            return None
        if not _WHOLE_NUMBER.fullmatch(value.strip()):
            self.refuse(name, f"{name}={value!r} is not a whole number")
            return None
        return int(value)

    def within(self, name: str, number: int | None, low: int, high: int, meaning: str) -> int | None:
        if number is None or low <= number <= high:
            return number
        self.refuse(name, f"{name}={self.env[name]!r} is out of range: {meaning}")
        return None

    def nodes(self, name: str) -> int | None:
        count = self.whole(name, self.required(name))
        return self.within(name, count, 1, MAX_NODES, f"a cluster has 1 to {MAX_NODES} nodes")

    def rank(self, name: str, nodes: int | None) -> int | None:
        rank = self.whole(name, self.required(name))
        if nodes is None:
            return self.within(name, rank, 0, MAX_NODES - 1, f"a node's rank is 0 to {MAX_NODES - 1}")
        return self.within(name, rank, 0, nodes - 1, f"with {_counted(nodes, 'node')} a node's rank is 0 to {nodes - 1}")

    def optional_whole(self, name: str) -> int | None:
        return self.whole(name, self.env.get(name))

    def processes(self, name: str, count: int | None, gpus_on_node: int) -> int | None:
        """At least one process, and no more than the node's GPUs when it has any."""
        if count is None:
            return None if name in self.env else _one_per_gpu(gpus_on_node)
        if count < 1:
            self.refuse(name, f"{name}={self.env[name]!r} is out of range: each node runs at least 1 process")
            return None
        if 0 < gpus_on_node < count:
            self.refuse(name, f"{name}={self.env[name]!r} asks for more processes than the {gpus_on_node} GPUs on this node; set it to {gpus_on_node} or fewer")
            return None
        return count

    def gpus_per_node(self, name: str) -> int | None:
        """A GPU count: 0 is a CPU node, which runs one process."""
        return self.within(name, self.optional_whole(name), 0, 1 << 16, "a node has 0 or more GPUs")

    def processes_from_gpus(self, name: str, gpus_per_node: int | None, gpus_on_node: int) -> int | None:
        """A platform's GPU count as processes: a CPU node (0 GPUs) runs one, unset means one per GPU here."""
        if gpus_per_node is None:
            return None if name in self.env else _one_per_gpu(gpus_on_node)
        return self.processes(name, max(gpus_per_node, 1), gpus_on_node)

    def host(self, name: str, host: str | None) -> str | None:
        if host is None:
            return None
        if not host.strip():
            self.refuse(name, f"{name}={host!r} is empty; it must be the address of node 0")
        elif any(character.isspace() for character in host):
            self.refuse(name, f"{name}={host!r} contains whitespace; it must be one address, that of node 0")
        elif ":" in host and not (host.startswith("[") and host.endswith("]")):
            self.refuse(name, f"{name}={host!r} looks like an IPv6 address without brackets; write it as '[{host}]'")
        else:
            return host
        return None

    def port(self, *names: str) -> int | None:
        """The first of `names` that is set, else the default port."""
        name = next((name for name in names if name in self.env), None)
        if name is None:
            return DEFAULT_PORT
        return self.within(name, self.optional_whole(name), 1, HIGHEST_PORT, f"a port is 1 to {HIGHEST_PORT}")

    def product_matches(self, name: str, nodes: int | None, per_node: int | None, meaning: str) -> None:
        total = self.optional_whole(name)
        if None in (total, nodes, per_node) or total == nodes * per_node:
            return
        self.refuse(name, f"{name}={self.env[name]!r} does not match {meaning} = {nodes} x {per_node} = {nodes * per_node}")


def _one_per_gpu(gpus_on_node: int) -> int:
    return max(gpus_on_node, 1)


def _address_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_runpod(reader: _Reader, gpus_on_node: int) -> _Found:
    nodes = reader.nodes("NUM_NODES")
    trainers = reader.processes("NUM_TRAINERS", reader.optional_whole("NUM_TRAINERS"), gpus_on_node)
    reader.product_matches("WORLD_SIZE", nodes, trainers, "NUM_NODES x NUM_TRAINERS")
    return _Found(
        platform="runpod",
        nodes=nodes,
        nodes_variable="NUM_NODES",
        rank=reader.rank("NODE_RANK", nodes),
        processes=trainers,
        processes_variable="NUM_TRAINERS",
        host=reader.host("PRIMARY_ADDR", reader.required("PRIMARY_ADDR")),
        port=reader.port("PRIMARY_PORT", "MASTER_PORT"),
        child_env=RUNPOD_CHILD_ENV,
    )


def _read_dstack(reader: _Reader, gpus_on_node: int) -> _Found:
    nodes = reader.nodes("DSTACK_NODES_NUM")
    gpus_per_node = reader.gpus_per_node("DSTACK_GPUS_PER_NODE")
    reader.product_matches("DSTACK_GPUS_NUM", nodes, gpus_per_node, "DSTACK_NODES_NUM x DSTACK_GPUS_PER_NODE")
    master = reader.host("DSTACK_MASTER_NODE_IP", reader.required("DSTACK_MASTER_NODE_IP"))
    _check_dstack_node_ips(reader, nodes, master)
    return _Found(
        platform="dstack",
        nodes=nodes,
        nodes_variable="DSTACK_NODES_NUM",
        rank=reader.rank("DSTACK_NODE_RANK", nodes),
        processes=reader.processes_from_gpus("DSTACK_GPUS_PER_NODE", gpus_per_node, gpus_on_node),
        processes_variable="DSTACK_GPUS_PER_NODE",
        host=master,
        port=reader.port("MASTER_PORT"),
        child_env={},
    )


def _node_addresses(reader: _Reader, name: str, nodes: int | None, nodes_variable: str) -> list[str]:
    """The platform's list of node addresses (one per line), which must have one per node."""
    text = reader.env[name]
    addresses = _address_lines(text)
    if nodes is not None and len(addresses) != nodes:
        reader.refuse(name, f"{name}={text!r} lists {len(addresses)} addresses but {nodes_variable}={nodes}")
    return addresses


def _check_dstack_node_ips(reader: _Reader, nodes: int | None, master: str | None) -> None:
    if "DSTACK_NODES_IPS" not in reader.env:
        return
    text = reader.env["DSTACK_NODES_IPS"]
    addresses = _node_addresses(reader, "DSTACK_NODES_IPS", nodes, "DSTACK_NODES_NUM")
    if master is not None and master not in addresses and master.strip("[]") not in addresses:
        reader.refuse("DSTACK_NODES_IPS", f"DSTACK_NODES_IPS={text!r} does not contain the master's address DSTACK_MASTER_NODE_IP={master!r}")


def _read_skypilot(reader: _Reader, gpus_on_node: int) -> _Found:
    nodes = reader.nodes("SKYPILOT_NUM_NODES")
    gpus_per_node = reader.gpus_per_node("SKYPILOT_NUM_GPUS_PER_NODE")
    addresses = _node_addresses(reader, "SKYPILOT_NODE_IPS", nodes, "SKYPILOT_NUM_NODES")
    return _Found(
        platform="skypilot",
        nodes=nodes,
        nodes_variable="SKYPILOT_NUM_NODES",
        rank=reader.rank("SKYPILOT_NODE_RANK", nodes),
        processes=reader.processes_from_gpus("SKYPILOT_NUM_GPUS_PER_NODE", gpus_per_node, gpus_on_node),
        processes_variable="SKYPILOT_NUM_GPUS_PER_NODE",
        host=reader.host("SKYPILOT_NODE_IPS", addresses[0] if addresses else ""),
        port=reader.port("MASTER_PORT"),
        child_env={},
    )


def _read_torchrun(reader: _Reader, gpus_on_node: int) -> _Found:
    nodes = reader.nodes("NNODES")
    return _Found(
        platform="torchrun",
        nodes=nodes,
        nodes_variable="NNODES",
        rank=reader.rank("NODE_RANK", nodes),
        processes=reader.processes("NPROC_PER_NODE", reader.optional_whole("NPROC_PER_NODE"), gpus_on_node),
        processes_variable="NPROC_PER_NODE",
        host=reader.host("MASTER_ADDR", reader.required("MASTER_ADDR")),
        port=reader.port("MASTER_PORT"),
        child_env={},
    )


# (platform, marker variable, reader), in the order they are tried.
PLATFORMS: tuple[tuple[str, str, Callable[[_Reader, int], _Found]], ...] = (
    ("runpod", "PRIMARY_ADDR", _read_runpod),
    ("dstack", "DSTACK_MASTER_NODE_IP", _read_dstack),
    ("skypilot", "SKYPILOT_NODE_IPS", _read_skypilot),
    ("torchrun", "NNODES", _read_torchrun),
)
PLATFORM_NAMES = {"runpod": "RunPod", "dstack": "dstack", "skypilot": "SkyPilot", "torchrun": "torchrun"}


def _job_problems(found: _Found, processes: int | None, nodes: int | None) -> list[Problem]:
    problems = []
    if nodes is not None and found.nodes is not None and nodes != found.nodes:
        problems.append(Problem("num_nodes", f"num_nodes={nodes} does not match this cluster's {found.nodes_variable}={found.nodes}; set num_nodes to {found.nodes} or leave it out"))
    if processes is not None and processes < 1:
        problems.append(Problem("num_processes", f"num_processes={processes} is out of range: each node runs at least 1 process"))
    elif processes is not None and found.processes is not None and processes > found.processes:
        problems.append(
            Problem("num_processes", f"num_processes={processes} is more than the {found.processes} processes per node this cluster offers ({found.processes_variable}); set it to {found.processes} or fewer")
        )
    return problems


def _child_env(env: Mapping[str, str], defaults: Mapping[str, str]) -> dict[str, str]:
    """The platform's defaults and ours, each only where the operator did not set that variable."""
    wanted = {**defaults, **ALWAYS_CHILD_ENV}
    return {name: value for name, value in wanted.items() if name not in env}


def cluster_platform(env: Mapping[str, str]) -> str | None:
    """The platform whose marker variable this environment carries, if any."""
    return next((platform for platform, marker, _ in PLATFORMS if marker in env), None)


def cluster_from_env(
    env: Mapping[str, str], gpus_on_node: int, processes: int | None = None, nodes: int | None = None
) -> tuple[ClusterPlan | None, list[Problem]]:
    """This node's place in a multi-node cluster, or None on one machine or without a known platform.

    `processes` and `nodes` are the job's num_processes and num_nodes when it gave them.
    Every problem of the detected platform is reported at once; with any, there is no plan.
    """
    detected = next(((platform, read) for platform, marker, read in PLATFORMS if marker in env), None)
    if detected is None:
        return None, []
    platform, read = detected
    reader = _Reader(env, PLATFORM_NAMES[platform])
    found = read(reader, gpus_on_node)
    problems = reader.problems + _job_problems(found, processes, nodes)
    if problems or found.nodes == 1:
        return None, problems
    return _plan(found, env, processes), []


def _plan(found: _Found, env: Mapping[str, str], processes: int | None) -> ClusterPlan:
    assert None not in (found.nodes, found.rank, found.processes, found.host, found.port), "a reader left a value unset without a problem"
    return ClusterPlan(
        platform=found.platform,
        nodes=found.nodes,
        node_rank=found.rank,
        processes_per_node=processes or found.processes,
        host=found.host,
        port=found.port,
        env=_child_env(env, found.child_env),
    )
