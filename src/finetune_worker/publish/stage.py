"""After training: evaluate against the base model, merge the LoRA, export GGUF files, push to the Hub.

Each step is a helper child (tools.py) whose argv comes from plan.py; the Hub token
lives only in those children's environment.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from finetune_worker.checks.continue_from import LORA_ADAPTERS
from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.plan.children import build_evaluation_argv, build_export_argv, build_hub_argv, build_merge_argv
from finetune_worker.plan.serving import run_recipe
from finetune_worker.publish.card import evaluation_sections, framework_versions, gguf_section, render_model_card
from finetune_worker.publish.export import failure_reason
from finetune_worker.run.failures import diagnose
from finetune_worker.run.rundir import copy_run_tokenizer, write_json
from finetune_worker.run.state import JobContext, JobState
from finetune_worker.run.tools import json_tool, run_tool, tool_output


@contextlib.contextmanager
def trained_model_kept(ctx: JobContext) -> Iterator[None]:
    """A step after training that ran past its deadline: the error says the trained model is kept."""
    try:
        yield
    except JobError as exc:
        if exc.code != errors.DEADLINE_EXCEEDED:
            raise
        raise JobError(exc.code, f"training succeeded, but {exc.message}. The artifacts are on the volume in {ctx.paths.output_dir}; "
                                 "resubmit the same run_id to go on without training", log_tail=exc.log_tail) from None


async def hub_tool(ctx: JobContext, state: JobState, name: str, command: str, *args: str) -> dict:
    out = tool_output(ctx, name)
    tool, outcome = await json_tool(ctx, state, name, build_hub_argv(sys.executable, command, *args, out=out), out)
    outcome = outcome or {"ok": False, "code": errors.PUSH_FAILED, "message": f"the Hub step exited with code {tool.returncode}"}
    if not outcome.get("ok"):
        outcome["log_tail"] = tool.log_tail()
    return outcome


async def check_token(ctx: JobContext, state: JobState, repo_ids: list[str]) -> tuple[str, list[str]]:
    """The token's user, and each repo with its owner (a bare name: the token's user's)."""
    outcome = await hub_tool(ctx, state, "hub-check", "check", *(f"--repo-id={repo}" for repo in repo_ids))
    if not outcome["ok"]:
        raise JobError(errors.AUTH_ERROR, outcome["message"], log_tail=outcome.get("log_tail", []))
    return outcome.get("user", "?"), outcome.get("repo_ids", repo_ids)


async def merge(ctx: JobContext, state: JobState) -> tuple[Path | None, str | None]:
    """Axolotl's merge-lora into <output_dir>/merged; (merged dir, None) or (None, why not)."""
    argv = build_merge_argv(sys.executable, ctx.paths.config_file, ctx.paths.output_dir)
    with trained_model_kept(ctx):
        tool = await run_tool(ctx, state, argv, "merge")
    merged = ctx.paths.output_dir / "merged"
    if tool.returncode == 0 and merged.is_dir() and any(merged.glob("*.safetensors")):
        copy_run_tokenizer(ctx.paths.output_dir, merged)
        return merged, None
    tail = [line for line in tool.log_tail() if line.strip()]
    return None, (tail[-1] if tail else f"merge-lora exited with code {tool.returncode}")


async def evaluate(ctx: JobContext, state: JobState) -> dict:
    """Base model vs fine-tune on the eval examples, kept in evaluation.json (a resubmission reuses it)."""
    paths = ctx.paths
    spec_file = paths.run_dir / "evaluation-spec.json"
    write_json(spec_file, {"config": str(paths.config_file), "evaluation": ctx.valid.job.evaluation.model_dump()})
    out = tool_output(ctx, "evaluation")
    with trained_model_kept(ctx):
        tool, evaluation = await json_tool(ctx, state, "evaluation", build_evaluation_argv(sys.executable, spec_file, out), out)
    if tool.returncode != 0 or evaluation is None:
        diagnosis = diagnose(tool.returncode, tool.log_tail(), "evaluating", None, ctx.plan.config.get("base_model"))
        raise JobError(
            diagnosis.code,
            f"training succeeded, but the evaluation failed: {diagnosis.message}. The model is in {paths.output_dir}; "
            "resubmit the same run_id to evaluate again without training",
            log_tail=tool.log_tail(),
        )
    write_json(paths.evaluation_file, evaluation)
    return evaluation


async def export_gguf(ctx: JobContext, state: JobState, model_dir: Path) -> list[str]:
    """Axolotl's GGUF export of model_dir into output/gguf, kept in export.json (a resubmission reuses it)."""
    paths = ctx.paths
    spec_file = paths.run_dir / "export-spec.json"
    write_json(spec_file, {"config": str(paths.config_file), "model_dir": str(model_dir), "llama_cpp_dir": str(ctx.settings.llama_cpp_dir)})
    out = tool_output(ctx, "export")
    tool, outcome = await json_tool(ctx, state, "export", build_export_argv(sys.executable, spec_file, out), out)
    if tool.returncode != 0 or not outcome or not outcome.get("ok"):
        message = (outcome or {}).get("message") or f"the export exited with code {tool.returncode}"
        raise export_failed(ctx, failure_reason(message, tool.log_tail()), tool.log_tail())
    write_json(paths.export_file, outcome["files"])
    return outcome["files"]


async def merge_for_export(ctx: JobContext, state: JobState) -> Path:
    """The LoRA merged into its base model (into output/merged), which the GGUF export converts."""
    merged, problem = await merge(ctx, state)
    if problem:
        raise export_failed(ctx, f"merging the LoRA into its base model failed: {problem}")
    return merged


def export_failed(ctx: JobContext, why: str, log_tail: list[str] | None = None) -> JobError:
    return JobError(
        errors.EXPORT_FAILED,
        f"training succeeded, but the GGUF export failed: {why}. The trained model is in {ctx.paths.output_dir}; "
        "resubmit the same run_id to export again without training",
        log_tail=log_tail or [],
    )


def deploy_recipe(ctx: JobContext, merged: Path | None, repo_id: str | None, on_volume: bool = True) -> dict:
    """How to serve this run: from the Hub once pushed (repo_id), else from the volume.
    `on_volume=False` (the model card): no path on the worker's volume."""
    config, publish = ctx.plan.config, ctx.valid.job.publish
    merged_where = None
    if merged is not None and repo_id and publish.merged_hub_model_id:
        merged_where = publish.merged_hub_model_id
    elif merged is not None and on_volume:
        merged_where = str(merged)
    return run_recipe(config, ctx.valid.job.model_id, repo_id or str(ctx.paths.output_dir),
                      config.get("adapter") in LORA_ADAPTERS, config.get("lora_r"), merged_where)


async def push(
    ctx: JobContext, state: JobState, trained: dict, has_curve: bool, merged: Path | None, evaluation: dict | None = None,
    gguf: list[str] | None = None,
) -> dict:
    """The output folder (adapter or model, tokenizer, GGUF files) with a model card; merged weights where asked."""
    paths, publish = ctx.paths, ctx.plan.publish
    merged_repo = ctx.valid.job.publish.merged_hub_model_id
    merged_where = None if merged is None else (merged_repo or f"{ctx.repo_id}:merged")
    in_repo = [Path(file).relative_to(paths.output_dir).as_posix() for file in gguf or []]
    card = render_model_card(
        repo_id=ctx.repo_id, config=ctx.plan.config, metrics=trained["metrics"], versions=framework_versions(),
        has_loss_curve=has_curve, merged=merged_where, lineage=ctx.valid.lineage,
        extra_sections=(evaluation_sections(evaluation) if evaluation else []) + gguf_section(ctx.repo_id, in_repo),
        deploy=deploy_recipe(ctx, merged, ctx.repo_id, on_volume=False),
    )
    paths.hub_dir.mkdir(exist_ok=True)
    (paths.hub_dir / "README.md").write_text(card, encoding="utf-8")
    extra = {"README.md": str(paths.hub_dir / "README.md")}
    if has_curve:
        extra["loss.png"] = str(paths.loss_curve)
    spec = {
        "repo_id": ctx.repo_id,
        "private": publish.get("hub_private_repo", True),
        "revision": publish.get("hub_revision"),
        "folder": str(paths.output_dir),
        "extra_files": extra,
        "commit_message": f"finetune-worker: {ctx.valid.job.model_id} run {ctx.valid.job.run_id}",
        "merged": None if merged is None else {
            "repo_id": merged_repo or ctx.repo_id, "folder": str(merged), "prefix": "" if merged_repo else "merged/",
        },
    }
    write_json(paths.hub_dir / "publish.json", spec)
    with trained_model_kept(ctx):
        outcome = await hub_tool(ctx, state, "hub-push", "push", "--spec", str(paths.hub_dir / "publish.json"))
    if not outcome["ok"]:
        code = outcome.get("code") if outcome.get("code") == errors.AUTH_ERROR else errors.PUSH_FAILED
        raise JobError(
            code,
            f"training succeeded, but publishing failed: {outcome['message']}. The artifacts are on the volume in "
            f"{paths.output_dir}; resubmit the same run_id to push them without training again",
            log_tail=outcome.get("log_tail", []),
        )
    outcome.pop("ok")
    return outcome
