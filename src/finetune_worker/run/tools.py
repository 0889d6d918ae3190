"""The child processes of a job, made in one place (`job_child`) so that each gets its
deadline: its own limit (FINETUNE_*_DEADLINE_S) or the job's (FINETUNE_MAX_HOURS), the
sooner. Helpers (Hub check and push, merge, preflight, evaluation) run to their end with
their own log in the run directory; a cancel stops them like a training."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from finetune_worker.run.children import ChildProcess
from finetune_worker.run.rundir import read_json
from finetune_worker.run.state import JobContext, JobState

# What each child is, as a deadline's error says it.
CHILD_WHAT = {
    "training": "the training", "preflight": "the preflight", "evaluation": "the evaluation", "merge": "the LoRA merge", "export": "the GGUF export",
    "generate": "the generate step", "hub-check": "the Hub token check", "hub-push": "the push to the Hub",
    "hub-model-config": "reading the base model's config.json from the Hub",
}


def job_child(argv: list[str], env: dict[str, str], log_file: Path, progress_file: Path, name: str, state: JobState) -> ChildProcess:
    """A child of this job, with its deadline (state.deadline)."""
    return ChildProcess(argv, env, log_file, progress_file, state.redactor, deadline=state.deadline(name),
                        what=CHILD_WHAT.get(name, f"the {name} step"))


async def run_child(argv: list[str], env: dict[str, str], log_dir: Path, name: str, state: JobState) -> ChildProcess:
    """Run a helper child to its end, its log in log_dir; a cancel stops it, and its
    deadline too (JobError deadline_exceeded)."""
    tool = job_child(argv, env, log_dir / f"{name}.log", log_dir / f".{name}.records", name, state)
    state.training = tool
    await tool.start()
    async for _ in tool.records():
        pass
    return tool


async def run_tool(ctx: JobContext, state: JobState, argv: list[str], name: str) -> ChildProcess:
    return await run_child(argv, ctx.child_env, ctx.paths.run_dir, name, state)


def tool_output(ctx: JobContext, name: str) -> Path:
    """Where a helper child writes its one JSON object (its `--out`)."""
    return ctx.paths.run_dir / f".{name}.json"


async def json_tool(ctx: JobContext, state: JobState, name: str, argv: list[str], out: Path) -> tuple[ChildProcess, Any]:
    """Run a helper whose argv ends in `--out out`; (the process, the JSON it wrote or None)."""
    out.unlink(missing_ok=True)
    tool = await run_tool(ctx, state, argv, name)
    return tool, read_json(out)


def free_port() -> int:
    """A free TCP port for torch.distributed's rendezvous, so jobs never collide on 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
