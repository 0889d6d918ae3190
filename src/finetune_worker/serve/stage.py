"""`mode: generate`: a finished run of this user answers prompts, in a child (serve/generate.py).

Nothing trains and no lock is taken. The run is looked up only under the job's own
user; its weights load in the child, whose answers arrive as `generation` events while
it runs and all together in the `result`. The child's files (spec, answers, log) go to
`<run>/generations/<time>/`; only the log is kept, however the job ends. Prompts are
capped in tokens (the run's sequence_len, or FINETUNE_MAX_PROMPT_TOKENS): the child
counts them with the run's tokenizer before any weights load.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from finetune_worker.checks.paths import make_roots
from finetune_worker.checks.validation import AXOLOTL_DEFAULT_SEQUENCE_LEN
from finetune_worker.contract import errors, events
from finetune_worker.contract.errors import JobError, Problem, problems_error
from finetune_worker.contract.job import DEFAULT_NEW_TOKENS, JobInput
from finetune_worker.contract.settings import WorkerSettings
from finetune_worker.host.failures import diagnose
from finetune_worker.host.resources import JobResources
from finetune_worker.host.rundir import RunPaths, read_json, write_json
from finetune_worker.host.tools import job_child
from finetune_worker.plan.children import build_generate_argv
from finetune_worker.plan.serving import run_recipe
from finetune_worker.serve.target import RunOutput, finished_run


def generation_options(job: JobInput) -> dict:
    return {"max_new_tokens": job.max_new_tokens or DEFAULT_NEW_TOKENS, "temperature": job.temperature or 0.0,
            "top_p": job.top_p if job.top_p is not None else 1.0}


async def generate(job: JobInput, settings: WorkerSettings, child_env: dict[str, str], resources: JobResources) -> AsyncIterator[dict]:
    roots = make_roots(settings.base_volume, settings.examples_dir, job.user_id)
    target = finished_run(settings.runs_dir, job.user_id, job.run_id, job.checkpoint or "final", roots=roots)
    items = job.prompts if job.prompts is not None else [[m.model_dump() for m in c] for c in job.messages]
    what = "adapter" if target.adapter else "weights"
    yield events.status("generating", f"loading run {job.run_id} ({_which(target)}: its {what}) to answer {len(items)} "
                                      f"{'prompt' if job.prompts is not None else 'conversation'}{'s' if len(items) != 1 else ''}")
    work = _fresh(target.run_dir / "generations" / time.strftime("%Y%m%d-%H%M%S"))
    options = generation_options(job)
    cap, cap_source = prompt_token_cap(target.config, settings)
    spec_file, answers, out = work / "spec.json", work / "answers.jsonl", work / "result.json"
    output_dir = target.model_dir if target.checkpoint == "final" else target.model_dir.parent
    spec = {"config": str(target.config_file), "model_dir": str(target.model_dir), "output_dir": str(output_dir), "records": str(answers),
            "prompts": job.prompts, "messages": None if job.prompts is not None else items, "max_prompt_tokens": cap, **options}
    resources.scratch += [spec_file, answers, out]  # the prompts and answers live in the job's result only, however it ends
    try:
        write_json(spec_file, spec)
        child = job_child(build_generate_argv(sys.executable, spec_file, out), child_env, work / "generate.log", answers, "generate", resources)
        resources.child = child  # a cancel stops it like a training
        await child.start()
        async for batch in child.records():
            for record in batch:
                if isinstance(record.get("index"), int) and 0 <= record["index"] < len(items):
                    yield events.generation(record["index"], items[record["index"]], str(record.get("completion", "")),
                                            int(record.get("tokens", 0)), str(record.get("finish_reason", "")))
        result = read_json(out)
    finally:
        resources.remove_scratch()
    if isinstance(result, dict) and isinstance(result.get("too_long"), list):
        field = "prompts" if job.prompts is not None else "messages"
        raise problems_error(errors.INVALID_INPUT, [
            Problem(f"{field}[{long['index']}]", f"{long['tokens']} tokens once formatted, over the limit of {cap} ({cap_source}); shorten it")
            for long in result["too_long"]])
    if child.returncode != 0 or not isinstance(result, dict):
        diagnosis = diagnose(child.returncode, child.log_tail(), "generating", None, target.base_model)
        raise JobError(diagnosis.code, f"generating with run {job.run_id!r} failed: {diagnosis.message}", log_tail=child.log_tail())
    completions = [{"index": i, "prompt": item, **answer} for i, (item, answer) in enumerate(zip(items, result["completions"], strict=True))]
    yield {
        "type": "result", "status": "completed", "mode": "generate", "run_id": job.run_id, "checkpoint": target.checkpoint,
        "prompt_format": result.get("style"), "generation": options, "completions": completions,
        "deploy": _recipe(target),
    }


def prompt_token_cap(config: dict, settings: WorkerSettings) -> tuple[int, str]:
    """The most tokens one formatted prompt may have: the run's sequence_len, or the
    operator's FINETUNE_MAX_PROMPT_TOKENS when lower; (the cap, where it comes from)."""
    length = config.get("sequence_len")
    length = length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else AXOLOTL_DEFAULT_SEQUENCE_LEN
    if settings.max_prompt_tokens is not None and settings.max_prompt_tokens < length:
        return settings.max_prompt_tokens, "this worker's FINETUNE_MAX_PROMPT_TOKENS"
    return length, "the run's sequence_len"


def _fresh(work: Path) -> Path:
    """A new directory for this job's child (two jobs in the same second get their own)."""
    for suffix in ("", *(f"-{n}" for n in range(2, 100))):
        candidate = work.with_name(work.name + suffix)
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise JobError(errors.INTERNAL_ERROR, "could not make a directory for this generate job")


def _which(target: RunOutput) -> str:
    return "its final output" if target.checkpoint == "final" else f"step {target.checkpoint}"


def _recipe(target: RunOutput) -> dict:
    """Serve the run from the Hub when it was pushed there, else from the volume."""
    stored = read_json(RunPaths(target.run_dir).result_file)
    hub = stored.get("hub") if isinstance(stored, dict) and isinstance(stored.get("hub"), dict) and target.checkpoint == "final" else None
    weights = hub["repo_id"] if hub and hub.get("repo_id") else str(target.model_dir)
    merged = str(target.merged_dir) if target.merged_dir else None
    return run_recipe(target.config, target.served_name, weights, target.adapter, target.lora_rank, merged)
