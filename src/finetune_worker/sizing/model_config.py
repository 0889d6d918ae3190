"""The base model's facts (config.json, weight size) for the memory and disk checks,
before any weights are downloaded.

From disk when the model is local, cached or baked into the image, or the Hub is off
(HF_HUB_OFFLINE). Otherwise, on the first job for a Hub model, a helper child
(`python -m finetune_worker.publish.hub model-config`, the token in its environment only)
downloads config.json and the weights' index into the Hub cache: a gated model or a bad
token fails here (auth_error), a missing repo or config.json too (model_load_error). A Hub
that cannot be reached is not the user's fault: a warning, and the job goes on without
the estimate (the download comes later anyway).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from finetune_worker.contract import errors, events
from finetune_worker.contract.errors import JobError
from finetune_worker.host.resources import JobResources
from finetune_worker.host.rundir import read_json
from finetune_worker.host.tools import run_child
from finetune_worker.plan.children import build_model_config_argv, hub_cache_dir
from finetune_worker.sizing.resources import ModelFacts, directory_facts, gib, model_facts


async def base_model_facts(config: dict, env: dict[str, str], child_env: dict[str, str], resources: JobResources) -> tuple[ModelFacts, list[dict]]:
    """(the facts, the events to report)."""
    base_model = str(config.get("base_model", ""))
    hub_cache = hub_cache_dir(child_env)
    facts = model_facts(base_model, hub_cache)
    prebaked = env.get("FINETUNE_PREBAKED_HF_CACHE")
    if facts.config is None and prebaked:
        baked = model_facts(base_model, Path(prebaked))
        if baked.config is not None:
            return baked, []
    offline = child_env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    local = base_model.startswith(("/", ".", "~")) or Path(base_model).exists()
    if facts.config is not None or offline or local or not base_model:
        return facts, []
    revision = config.get("revision_of_model")
    with tempfile.TemporaryDirectory(prefix="model-config-") as scratch:  # the run directory is not ours yet
        out = Path(scratch) / "result.json"
        argv = build_model_config_argv(sys.executable, base_model, str(revision) if revision else None, out=out)
        tool = None
        try:
            tool = await run_child(argv, child_env, Path(scratch), "hub-model-config", resources)
            outcome = read_json(out) or {"ok": False, "code": "network", "message": f"the Hub step exited with code {tool.returncode}"}
        except JobError as exc:
            if exc.code != errors.DEADLINE_EXCEEDED or (resources.job_deadline is not None and resources.job_deadline.passed):
                raise
            outcome = {"ok": False, "code": "network", "message": "the Hub did not answer in time (FINETUNE_HUB_CHECK_DEADLINE_S)"}
        finally:
            resources.child = None
    if outcome.get("ok"):
        snapshot = outcome.get("snapshot")
        facts = directory_facts(Path(snapshot)) if snapshot and Path(snapshot).is_dir() else model_facts(base_model, hub_cache)
        size = f"{gib(facts.weight_bytes)} of weights to download" if facts.weight_bytes else "weights of unknown size to download"
        return facts, [events.status("validating", f"read {base_model}'s config.json from the Hugging Face Hub ({size})")]
    if outcome.get("code") in (errors.AUTH_ERROR, errors.MODEL_LOAD_ERROR):
        raise JobError(outcome["code"], outcome["message"], log_tail=tool.log_tail() if tool else [])
    return facts, [events.warning(f"no memory estimate: could not read {base_model}'s config.json from the Hub ({outcome.get('message')}); going on")]
