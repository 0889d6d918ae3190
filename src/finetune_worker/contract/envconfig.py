"""An Axolotl config from AXOLOTL_* environment variables (Pods, and endpoint defaults).

    AXOLOTL_BASE_MODEL=NousResearch/Llama-3.2-1B          -> base_model: NousResearch/Llama-3.2-1B
    AXOLOTL_LEARNING_RATE=0.0002                           -> learning_rate: 0.0002
    AXOLOTL_DATASETS='[{"path":"x/y","type":"alpaca"}]'    -> datasets: [...]
    AXOLOTL_FSDP_CONFIG__FSDP_VERSION=2                    -> fsdp_config: {fsdp_version: 2}

A value is read as JSON when it parses (numbers, true/false, null, lists, objects,
quoted strings), as a boolean for True/False/yes/no, and as a plain string otherwise.
Pure: the environment comes in as a mapping.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from finetune_worker.contract.errors import Problem

PREFIX = "AXOLOTL_"
NESTING = "__"
# Variables Axolotl (or this worker) reads itself; they are not config options.
RUNTIME_VARIABLES = frozenset({
    "AXOLOTL_DO_NOT_TRACK", "AXOLOTL_TEE_STDOUT", "AXOLOTL_LOG_LEVEL", "AXOLOTL_CONFIG_CLI_OPTIONS", "AXOLOTL_IS_PREPROCESS",
    "AXOLOTL_NCCL_TIMEOUT", "AXOLOTL_LOGO", "AXOLOTL_LOAD_WORKERS", "AXOLOTL_TILED_MLP_ACCUM_FP32", "AXOLOTL_MX_DX_SAFE_CONFIG",
    "AXOLOTL_MARLIN_CACHE_MIN_FREE_GB", "AXOLOTL_DIRECT_EXPERT_LOAD", "AXOLOTL_CCE_FORK", "AXOLOTL_METRIC_NDIGITS",
    "AXOLOTL_LAUNCHER", "AXOLOTL_LAUNCHER_ARGS", "AXOLOTL_DATASET_NUM_PROC", "AXOLOTL_AUTORUN", "AXOLOTL_SERVE", "AXOLOTL_SERVE_PORT",
})
RUNTIME_PREFIXES = ("AXOLOTL_SONICMOE_", "AXOLOTL_EP_")
TRUE_WORDS = ("true", "yes", "on")
FALSE_WORDS = ("false", "no", "off")


def is_config_variable(name: str) -> bool:
    return name.startswith(PREFIX) and name not in RUNTIME_VARIABLES and not name.startswith(RUNTIME_PREFIXES)


def parse_value(text: str) -> Any:
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    if stripped.lower() in TRUE_WORDS:
        return True
    if stripped.lower() in FALSE_WORDS:
        return False
    return text


def env_name(path: list[str]) -> str:
    return PREFIX + NESTING.join(part.upper() for part in path)


def args_from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str], list[Problem]]:
    """(args, where each top-level key came from, problems) from AXOLOTL_* variables."""
    args: dict[str, Any] = {}
    origin: dict[str, str] = {}
    problems: list[Problem] = []
    for name in sorted(n for n in env if is_config_variable(n)):
        path = [part.lower() for part in name[len(PREFIX):].split(NESTING)]
        if not all(path):
            problems.append(Problem(name, "empty key segment; use a single '__' between nested keys"))
            continue
        node = args
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(Problem(name, f"{env_name(path[: depth + 1])} is not an object, so it cannot hold '{path[depth + 1]}'"))
                break
            node = child
        else:
            if isinstance(node.get(path[-1]), dict) and not isinstance(parse_value(env[name]), dict):
                problems.append(Problem(name, f"conflicts with nested variables {name}{NESTING}*"))
                continue
            node[path[-1]] = parse_value(env[name])
            origin.setdefault(path[0], env_name(path[:1]))
    return args, origin, problems


def name_problems_by_variable(problems: list[Problem], origin: dict[str, str]) -> list[Problem]:
    """Rewrite `args.learning_rate: ...` as `AXOLOTL_LEARNING_RATE: ...` (hints too)."""
    named = []
    for problem in problems:
        path = problem.path.removeprefix("args.")
        key = re.split(r"[.\[]", path, maxsplit=1)[0]
        if not problem.path.startswith("args.") or key not in origin:
            named.append(problem)
            continue
        rest = path[len(key):]
        where = origin[key] + (f" ({key}{rest})" if rest else "")
        message = problem.message
        if not rest:  # a misspelt top-level option: suggest the variable, not the key
            message = re.sub(r"did you mean '([^']+)'", lambda m: f"did you mean '{PREFIX}{m.group(1).upper()}'", message)
        named.append(Problem(where, message))
    return named
