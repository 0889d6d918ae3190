"""The child processes of a job, made in one place (`job_child`) so that each gets its
deadline: its own limit (FINETUNE_*_DEADLINE_S) or the job's (FINETUNE_MAX_HOURS), the
sooner. Helpers (Hub check and push, merge, preflight, evaluation) run to their end with
their own log in the run directory; a cancel stops them like a training."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from finetune_worker.host.children import ChildProcess
from finetune_worker.host.resources import JobResources
from finetune_worker.host.rundir import read_json

# What each child is, as a deadline's error says it.
CHILD_WHAT = {
    "training": "the training", "preflight": "the preflight", "evaluation": "the evaluation", "merge": "the LoRA merge",
    "export": "the GGUF export", "generate": "the generate step", "hub-check": "the Hub token check",
    "hub-push": "the push to the Hub", "hub-model-config": "reading the base model's config.json from the Hub",
    "storage": "the storage step",
}


def job_child(argv: list[str], env: dict[str, str], log_file: Path, progress_file: Path, name: str, resources: JobResources) -> ChildProcess:
    """A child of this job, with its deadline (resources.deadline)."""
    return ChildProcess(argv, env, log_file, progress_file, resources.redactor, deadline=resources.deadline(name),
                        what=CHILD_WHAT.get(name, f"the {name} step"))


async def run_child(argv: list[str], env: dict[str, str], log_dir: Path, name: str, resources: JobResources) -> ChildProcess:
    """Run a helper child to its end, its log in log_dir; a cancel stops it, and its
    deadline too (JobError deadline_exceeded)."""
    tool = job_child(argv, env, log_dir / f"{name}.log", log_dir / f".{name}.records", name, resources)
    resources.child = tool
    await tool.start()
    async for _ in tool.records():
        pass
    return tool


async def finish_standby(tool: ChildProcess, resources: JobResources) -> ChildProcess:
    """Tell a helper child started on standby to go, and follow it to its end (as run_child)."""
    resources.child = tool
    await tool.go()
    async for _ in tool.records():
        pass
    return tool


def tool_output(run_dir: Path, name: str) -> Path:
    """Where a helper child writes its one JSON object (its `--out`)."""
    return run_dir / f".{name}.json"


async def json_tool(argv: list[str], out: Path, env: dict[str, str], run_dir: Path, name: str,
                    resources: JobResources) -> tuple[ChildProcess, Any]:
    """Run a helper whose argv ends in `--out out`, its log in the run directory;
    (the process, the JSON it wrote or None)."""
    out.unlink(missing_ok=True)
    tool = await run_child(argv, env, run_dir, name, resources)
    return tool, read_json(out)


def free_port() -> int:
    """A free TCP port for torch.distributed's rendezvous, so jobs never collide on 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
