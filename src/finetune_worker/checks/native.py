"""`trust_remote_code: true` on a model that transformers implements itself.

Many configs in the wild (Axolotl's own examples for Mistral, Mixtral, Qwen2, Phi-3,
Falcon, DBRX, Jamba, ...) set `trust_remote_code: true` from the days those models
needed their repository's code. Today the flag only makes transformers prefer the
repository's code over its own classes. So once the base model's config.json is known
(read before any weights, sizing/model_config.py), a model type that the installed
transformers implements loads with its native classes: the flag is dropped, with a
warning. Any other model needs its repository's code, which runs only where the
operator allows remote code (FINETUNE_ALLOW_TRUST_REMOTE_CODE).
"""

from __future__ import annotations

from typing import Any

from finetune_worker.contract.errors import Problem

NATIVE_CHECKED_KEY = "trust_remote_code"


def native_model_types() -> frozenset[str]:
    """The `model_type`s of config.json that the installed transformers implements."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return frozenset(CONFIG_MAPPING_NAMES)


def remote_code_decision(args: dict[str, Any], model_config: dict | None, allowed: bool) -> tuple[bool, str | None, Problem | None]:
    """(drop the flag, the note saying so, the problem refusing it) for a config that sets
    `trust_remote_code`, given the base model's config.json (None when it could not be read)."""
    if not args.get(NATIVE_CHECKED_KEY) or allowed:
        return False, None, None
    base = args.get("base_model")
    model_type = (model_config or {}).get("model_type")
    where = f"args.{NATIVE_CHECKED_KEY}"
    if model_config is None:
        return False, None, Problem(where, (
            f"the worker could not read {base}'s config.json to check whether transformers implements the model itself, and running "
            "a repository's code is disabled on this worker; remove trust_remote_code, or ask the operator to set FINETUNE_ALLOW_TRUST_REMOTE_CODE=1"))
    if isinstance(model_type, str) and model_type in native_model_types():
        note = (f"{where}: {base} is a '{model_type}' model, which the installed transformers implements, so it loads with "
                "transformers' own classes and trust_remote_code is dropped (no repository code runs)")
        return True, note, None
    what = f"a '{model_type}' model" if isinstance(model_type, str) else "a model without a model_type in its config.json"
    return False, None, Problem(where, (
        f"{base} is {what}, which the installed transformers does not implement, so its repository's own code would run; "
        "that is disabled on this worker. Use a model that transformers supports natively, or ask the operator to set "
        "FINETUNE_ALLOW_TRUST_REMOTE_CODE=1"))
