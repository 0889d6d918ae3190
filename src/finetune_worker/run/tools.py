"""Helper child processes of a job (Hub check and push, merge, preflight, evaluation):
each runs to its end with its own log in the run directory; a cancel stops it like a training."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from finetune_worker.run.children import ChildProcess
from finetune_worker.run.rundir import read_json
from finetune_worker.run.state import JobContext, JobState


async def run_child(
    argv: list[str], env: dict[str, str], log_dir: Path, name: str, state: JobState, deadline: float | None = None
) -> ChildProcess:
    """Run a helper child to its end (or its deadline), its log in log_dir; a cancel stops it."""
    tool = ChildProcess(argv, env, log_dir / f"{name}.log", log_dir / f".{name}.records", state.redactor)
    state.training = tool
    await tool.start()
    async for _ in tool.records(deadline=deadline):
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
