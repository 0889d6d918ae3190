"""After training: evaluate against the base model, merge the LoRA, export GGUF files, push to the Hub.

Each step is a helper child (tools.py) whose argv comes from plan.py; the Hub token
lives only in those children's environment.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.job import LORA_ADAPTERS
from finetune_worker.host.failures import diagnose
from finetune_worker.host.resources import JobResources
from finetune_worker.host.rundir import copy_run_tokenizer, write_json
from finetune_worker.host.tools import json_tool, run_child, tool_output
from finetune_worker.plan.children import build_evaluation_argv, build_export_argv, build_hub_argv, build_merge_argv
from finetune_worker.plan.serving import run_recipe
from finetune_worker.publish.card import (
    cluster_section,
    evaluation_sections,
    framework_versions,
    gguf_section,
    render_model_card,
    time_and_cost_section,
)
from finetune_worker.publish.export import failure_reason
from finetune_worker.run.job import JobRun
from finetune_worker.run.training import job_measured


@contextlib.contextmanager
def trained_model_kept(run: JobRun) -> Iterator[None]:
    """A step after training that ran past its deadline: the error says the trained model is kept."""
    try:
        yield
    except JobError as exc:
        if exc.code != errors.DEADLINE_EXCEEDED:
            raise
        raise JobError(exc.code, f"training succeeded, but {exc.message}. The artifacts are on the volume in {run.paths.output_dir}; "
                                 "resubmit the same run_id to go on without training", log_tail=exc.log_tail) from None


async def _helper(run: JobRun, resources: JobResources, name: str, argv: list[str], out: Path):
    """A helper child of this run (its log in the run directory); (the process, the JSON it wrote)."""
    return await json_tool(argv, out, run.child_env, run.paths.run_dir, name, resources)


async def hub_tool(run: JobRun, resources: JobResources, name: str, command: str, *args: str) -> dict:
    out = tool_output(run.paths.run_dir, name)
    tool, outcome = await _helper(run, resources, name, build_hub_argv(sys.executable, command, *args, out=out), out)
    outcome = outcome or {"ok": False, "code": errors.PUSH_FAILED, "message": f"the Hub step exited with code {tool.returncode}"}
    if not outcome.get("ok"):
        outcome["log_tail"] = tool.log_tail()
    return outcome


async def check_token(run: JobRun, resources: JobResources, repo_ids: list[str]) -> tuple[str, list[str]]:
    """The token's user, and each repo with its owner (a bare name: the token's user's)."""
    outcome = await hub_tool(run, resources, "hub-check", "check", *(f"--repo-id={repo}" for repo in repo_ids))
    if not outcome["ok"]:
        raise JobError(errors.AUTH_ERROR, outcome["message"], log_tail=outcome.get("log_tail", []))
    return outcome.get("user", "?"), outcome.get("repo_ids", repo_ids)


async def merge(run: JobRun, resources: JobResources) -> tuple[Path | None, str | None]:
    """Axolotl's merge-lora into <output_dir>/merged; (merged dir, None) or (None, why not)."""
    paths = run.paths
    argv = build_merge_argv(sys.executable, paths.config_file, paths.output_dir)
    with trained_model_kept(run):
        tool = await run_child(argv, run.child_env, paths.run_dir, "merge", resources)
    merged = paths.output_dir / "merged"
    if tool.returncode == 0 and merged.is_dir() and any(merged.glob("*.safetensors")):
        copy_run_tokenizer(paths.output_dir, merged)
        return merged, None
    tail = [line for line in tool.log_tail() if line.strip()]
    return None, (tail[-1] if tail else f"merge-lora exited with code {tool.returncode}")


async def evaluate(run: JobRun, resources: JobResources) -> dict:
    """Base model vs fine-tune on the eval examples, kept in evaluation.json (a resubmission reuses it)."""
    paths = run.paths
    spec_file = paths.run_dir / "evaluation-spec.json"
    write_json(spec_file, {"config": str(paths.config_file), "evaluation": run.job.evaluation.model_dump()})
    out = tool_output(paths.run_dir, "evaluation")
    with trained_model_kept(run):
        tool, evaluation = await _helper(run, resources, "evaluation", build_evaluation_argv(sys.executable, spec_file, out), out)
    if tool.returncode != 0 or evaluation is None:
        diagnosis = diagnose(tool.returncode, tool.log_tail(), "evaluating", None, run.plan.config.get("base_model"))
        raise JobError(
            diagnosis.code,
            f"training succeeded, but the evaluation failed: {diagnosis.message}. The model is in {paths.output_dir}; "
            "resubmit the same run_id to evaluate again without training",
            log_tail=tool.log_tail(),
        )
    write_json(paths.evaluation_file, evaluation)
    return evaluation


async def export_gguf(run: JobRun, resources: JobResources, model_dir: Path) -> list[str]:
    """Axolotl's GGUF export of model_dir into output/gguf, kept in export.json (a resubmission reuses it)."""
    paths = run.paths
    spec_file = paths.run_dir / "export-spec.json"
    write_json(spec_file, {"config": str(paths.config_file), "model_dir": str(model_dir), "llama_cpp_dir": str(run.settings.llama_cpp_dir)})
    out = tool_output(paths.run_dir, "export")
    tool, outcome = await _helper(run, resources, "export", build_export_argv(sys.executable, spec_file, out), out)
    if tool.returncode != 0 or not outcome or not outcome.get("ok"):
        message = (outcome or {}).get("message") or f"the export exited with code {tool.returncode}"
        raise export_failed(run, failure_reason(message, tool.log_tail()), tool.log_tail())
    write_json(paths.export_file, outcome["files"])
    return outcome["files"]


async def merge_for_export(run: JobRun, resources: JobResources) -> Path:
    """The LoRA merged into its base model (into output/merged), which the GGUF export converts."""
    merged, problem = await merge(run, resources)
    if problem:
        raise export_failed(run, f"merging the LoRA into its base model failed: {problem}")
    return merged


def export_failed(run: JobRun, why: str, log_tail: list[str] | None = None) -> JobError:
    return JobError(
        errors.EXPORT_FAILED,
        f"training succeeded, but the GGUF export failed: {why}. The trained model is in {run.paths.output_dir}; "
        "resubmit the same run_id to export again without training",
        log_tail=log_tail or [],
    )


def deploy_recipe(run: JobRun, merged: Path | None, repo_id: str | None, on_volume: bool = True) -> dict:
    """How to serve this run: from the Hub once pushed (repo_id), else from the volume.
    `on_volume=False` (the model card): no path on the worker's volume."""
    config, publish = run.plan.config, run.job.publish
    merged_where = None
    if merged is not None and repo_id and publish.merged_hub_model_id:
        merged_where = publish.merged_hub_model_id
    elif merged is not None and on_volume:
        merged_where = str(merged)
    return run_recipe(config, run.job.model_id, repo_id or str(run.paths.output_dir),
                      config.get("adapter") in LORA_ADAPTERS, config.get("lora_r"), merged_where)


def model_card(run: JobRun, merged: Path | None) -> str:
    """The card pushed with the model: what it is, how it was made and measured, how to serve it."""
    merged_where = None if merged is None else (run.job.publish.merged_hub_model_id or f"{run.repo_id}:merged")
    in_repo = [Path(file).relative_to(run.paths.output_dir).as_posix() for file in run.gguf or []]
    return render_model_card(
        repo_id=run.repo_id, config=run.plan.config, metrics=run.trained["metrics"], versions=framework_versions(),
        has_loss_curve=run.has_curve, merged=merged_where, lineage=run.valid.lineage,
        extra_sections=(evaluation_sections(run.evaluation) if run.evaluation else []) + gguf_section(run.repo_id, in_repo)
        + cluster_section(run.trained.get("cluster"))
        + time_and_cost_section(job_measured(run, time.monotonic() - run.started) if run.trained.get("measured") else None, run.estimate_row),
        deploy=deploy_recipe(run, merged, run.repo_id, on_volume=False),
    )


def push_spec(run: JobRun, merged: Path | None) -> Path:
    """What the Hub child pushes (publish.json): the output folder, the card and loss curve, merged weights where asked."""
    paths, publish, merged_repo = run.paths, run.plan.publish, run.job.publish.merged_hub_model_id
    paths.hub_dir.mkdir(exist_ok=True)
    (paths.hub_dir / "README.md").write_text(model_card(run, merged), encoding="utf-8")
    extra = {"README.md": str(paths.hub_dir / "README.md")}
    if run.has_curve:
        extra["loss.png"] = str(paths.loss_curve)
    spec = {
        "repo_id": run.repo_id, "private": publish.get("hub_private_repo", True), "revision": publish.get("hub_revision"),
        "folder": str(paths.output_dir), "extra_files": extra,
        "commit_message": f"finetune-worker: {run.job.model_id} run {run.job.run_id}",
        "merged": None if merged is None else {
            "repo_id": merged_repo or run.repo_id, "folder": str(merged), "prefix": "" if merged_repo else "merged/",
        },
    }
    write_json(paths.hub_dir / "publish.json", spec)
    return paths.hub_dir / "publish.json"


async def push(run: JobRun, resources: JobResources, merged: Path | None) -> dict:
    """The output folder (adapter or model, tokenizer, GGUF files) with a model card; merged weights where asked."""
    spec = push_spec(run, merged)
    with trained_model_kept(run):
        outcome = await hub_tool(run, resources, "hub-push", "push", "--spec", str(spec))
    if not outcome["ok"]:
        code = outcome.get("code") if outcome.get("code") == errors.AUTH_ERROR else errors.PUSH_FAILED
        raise JobError(
            code,
            f"training succeeded, but publishing failed: {outcome['message']}. The artifacts are on the volume in "
            f"{run.paths.output_dir}; resubmit the same run_id to push them without training again",
            log_tail=outcome.get("log_tail", []),
        )
    outcome.pop("ok")
    return outcome
