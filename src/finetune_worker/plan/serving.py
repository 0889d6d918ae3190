"""How a finished run is served: the OpenAI-compatible server's argv (vLLM, or
transformers' own `transformers serve`), and the deploy recipe every result and model
card carries (RunPod's vLLM worker, `vllm serve`, `transformers serve`).

Pure: every input is an argument (the run's config, its weights, the environment).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

VLLM, TRANSFORMERS = "vllm", "transformers"
# The ranks vLLM's --max-lora-rank accepts (vllm.config.lora.MaxLoRARanks); its default is 16.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_LORA_RANK = 16
# Overrides on a Pod. Not vLLM's own VLLM_* variables (vLLM reads VLLM_PORT and
# VLLM_HOST_IP for its internal traffic): these are read here and never reach vLLM.
SERVE_OVERRIDES = {
    "max_model_len": "VLLM_MAX_MODEL_LEN",
    "gpu_memory_utilization": "VLLM_GPU_MEMORY_UTILIZATION",
    "max_lora_rank": "VLLM_MAX_LORA_RANK",
    "served_model_name": "VLLM_SERVED_MODEL_NAME",
    "config_file": "VLLM_CONFIG_FILE",
    "extra_args": "VLLM_EXTRA_ARGS",
}


# The server's API key, from the environment only (never argv, where `ps` shows it):
# FINETUNE_SERVE_API_KEY (or vLLM's own VLLM_API_KEY). vLLM reads VLLM_API_KEY
# (vllm/entrypoints/openai/api_server.py: `--api-key` or VLLM_API_KEY) and then
# answers /v1/* only with `Authorization: Bearer <key>`.
SERVE_API_KEY = "FINETUNE_SERVE_API_KEY"
VLLM_API_KEY = "VLLM_API_KEY"
NO_API_KEY_IN_TRANSFORMERS = (
    f"{SERVE_API_KEY} is set, but transformers serve has no API key (its `serve` command takes none and checks no "
    "Authorization header), so it would answer anyone: install vLLM to serve with a key, or unset the key to serve "
    "without one (on 127.0.0.1, or behind a proxy that checks callers)"
)


@dataclass(frozen=True)
class ServeOptions:
    served_model_name: str
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    max_lora_rank: int | None = None  # set for an adapter
    config_file: str | None = None  # a `vllm serve --config` YAML (examples/vllm_config_example.yaml)
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Served:
    """What the server loads: full weights, or a base model with a LoRA adapter."""

    model: str  # a Hub id or a local directory
    adapter: str | None = None  # the adapter's Hub id or directory


def vllm_lora_rank(rank: int | None) -> int:
    """The smallest rank vLLM accepts that holds the adapter's (vLLM refuses any other)."""
    if not rank:
        return VLLM_DEFAULT_LORA_RANK
    return next((allowed for allowed in VLLM_LORA_RANKS if allowed >= rank), VLLM_LORA_RANKS[-1])


def serve_options(config: Mapping[str, Any], name: str, lora_rank: int | None, adapter: bool) -> ServeOptions:
    """The server's settings from the run: its name, its sequence length, its adapter's rank."""
    length = config.get("sequence_len")
    return ServeOptions(
        served_model_name=name,
        max_model_len=length if isinstance(length, int) and not isinstance(length, bool) else None,
        max_lora_rank=vllm_lora_rank(lora_rank) if adapter else None,
    )


def with_overrides(options: ServeOptions, env: Mapping[str, str]) -> tuple[ServeOptions, list[str]]:
    """The VLLM_* overrides from the environment; (options, problems naming each bad variable)."""
    changes: dict[str, Any] = {}
    problems = []
    for field, variable in SERVE_OVERRIDES.items():
        value = env.get(variable, "").strip()
        if not value:
            continue
        try:
            if field in ("max_model_len", "max_lora_rank"):
                changes[field] = _positive(int(value))
            elif field == "gpu_memory_utilization":
                changes[field] = _fraction(float(value))
            elif field == "extra_args":
                changes[field] = tuple(shlex.split(value))
            else:
                changes[field] = value
        except ValueError as exc:
            problems.append(f"{variable}={value!r}: {exc}")
    if "max_lora_rank" in changes and changes["max_lora_rank"] not in VLLM_LORA_RANKS:
        problems.append(f"VLLM_MAX_LORA_RANK={changes.pop('max_lora_rank')}: vLLM accepts one of {', '.join(map(str, VLLM_LORA_RANKS))}")
    return replace(options, **changes), problems


def _positive(value: int) -> int:
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _fraction(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError("must be a fraction of the GPU's memory, above 0 and at most 1")
    return value


def build_server_argv(server: str, served: Served, options: ServeOptions, host: str, port: int) -> list[str]:
    """The one place a server's command line is built: `vllm serve` (an adapter with
    --enable-lora, or full weights), or `transformers serve` (full weights only).
    Every value goes as `--option=value`, and the model (a positional) never starts
    with '-', so no name from a run can read as an option. No API key here: the
    server reads it from its environment (serve_api_key_env)."""
    where = [f"--host={host}", f"--port={port}"]
    if server == VLLM:
        return [*vllm_serve_argv(served, options), *where]
    if server == TRANSFORMERS:
        if served.adapter:
            raise ValueError("transformers serve loads full weights only: merge the LoRA first")
        return ["transformers", "serve", positional(served.model), *where]
    raise ValueError(f"unknown server {server!r}; use {VLLM} or {TRANSFORMERS}")


def positional(value: str) -> str:
    """A model (Hub id or directory) as a positional argument: a relative path that
    starts with '-' gets './' (a Hub id never does), so it cannot read as an option.
    (Not `-- MODEL`: vLLM's --config handling wants the model right after `serve`.)"""
    return f"./{value}" if value.startswith("-") else value


def vllm_serve_argv(served: Served, options: ServeOptions) -> list[str]:
    argv = ["vllm", "serve", positional(served.model)]
    if served.adapter:
        argv += ["--enable-lora", f"--lora-modules={options.served_model_name}={served.adapter}",
                 f"--max-lora-rank={options.max_lora_rank or VLLM_DEFAULT_LORA_RANK}"]
    else:
        argv += [f"--served-model-name={options.served_model_name}"]
    if options.max_model_len:
        argv += [f"--max-model-len={options.max_model_len}"]
    if options.gpu_memory_utilization:
        argv += [f"--gpu-memory-utilization={options.gpu_memory_utilization}"]
    if options.config_file:  # two words: vLLM looks for the word `--config` to read the file
        argv += ["--config", positional(options.config_file)]
    return [*argv, *options.extra_args]


def serve_api_key(env: Mapping[str, str]) -> str | None:
    return (env.get(SERVE_API_KEY) or env.get(VLLM_API_KEY) or "").strip() or None


def server_env(server: str, env: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: ours without the variables read here (vLLM warns of
    VLLM_* it does not know), and the API key where vLLM reads it. A key with a server
    that cannot check it is a ValueError: serving it open would ignore the key."""
    key = serve_api_key(env)
    kept = {name: value for name, value in env.items() if name not in (*SERVE_OVERRIDES.values(), SERVE_API_KEY, VLLM_API_KEY)}
    if key and server != VLLM:
        raise ValueError(NO_API_KEY_IN_TRANSFORMERS)
    return {**kept, VLLM_API_KEY: key} if key else kept


# -- the deploy recipe --------------------------------------------------------------


def deploy_recipe(served: Served, options: ServeOptions, merged: Served | None = None) -> dict[str, Any]:
    """How to serve the fine-tune elsewhere: RunPod's vLLM worker's environment, the
    `vllm serve` command line, and `transformers serve` (full or merged weights)."""
    recipe: dict[str, Any] = {
        "model": options.served_model_name,
        "runpod_vllm_worker": {"image": "runpod/worker-v1-vllm", "env": runpod_vllm_env(served, options)},
        "vllm_serve": shlex.join(vllm_serve_argv(served, options)),
    }
    full = served if not served.adapter else merged
    if full is not None:
        recipe["transformers_serve"] = shlex.join(["transformers", "serve", positional(full.model)])
    else:
        recipe["transformers_serve"] = None
        recipe["note"] = ("transformers serve loads full weights: merge the adapter first "
                          "(publish.merge_lora, or axolotl merge-lora on the run's config.yaml)")
    if served.adapter and merged is not None:
        merged_options = replace(options, max_lora_rank=None)
        recipe["merged"] = {"runpod_vllm_worker": {"image": "runpod/worker-v1-vllm", "env": runpod_vllm_env(merged, merged_options)},
                            "vllm_serve": shlex.join(vllm_serve_argv(merged, merged_options))}
    return recipe


def runpod_vllm_env(served: Served, options: ServeOptions) -> dict[str, str]:
    """The variables runpod-workers/worker-vllm reads (MODEL_NAME, ENABLE_LORA, LORA_MODULES, ...)."""
    env = {"MODEL_NAME": served.model}
    if served.adapter:
        env.update(ENABLE_LORA="true", LORA_MODULES=json.dumps([{"name": options.served_model_name, "path": served.adapter}]),
                   MAX_LORA_RANK=str(options.max_lora_rank or VLLM_DEFAULT_LORA_RANK))
    else:
        env["OPENAI_SERVED_MODEL_NAME_OVERRIDE"] = options.served_model_name
    if options.max_model_len:
        env["MAX_MODEL_LEN"] = str(options.max_model_len)
    return env


def run_recipe(config: Mapping[str, Any], name: str, weights: str, adapter: bool, lora_rank: int | None,
               merged: str | None = None) -> dict[str, Any]:
    """The recipe of one run: `weights` is its adapter (on config's base_model) or its full
    weights, as a Hub repo id once pushed, else a directory on the volume."""
    served = Served(str(config.get("base_model", "")), adapter=weights) if adapter else Served(weights)
    return deploy_recipe(served, serve_options(config, name, lora_rank, adapter), Served(merged) if merged else None)
