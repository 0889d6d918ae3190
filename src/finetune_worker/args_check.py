"""Check the `args` section (an Axolotl config) before anything is downloaded.

Every problem is collected and reported at once, each with its path in the request
(`args.datasets[0].type`) and a hint. The worker's own rules (paths, plugins,
remote code, hardware) run first; Axolotl's schema runs last over what is left.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from . import axolotl_schema
from .distributed import PRESET_DIR, combination_problems, resolve_presets
from .errors import Problem
from .hardware import Hardware
from .job import HUB_REPO_ID, suggest
from .paths import PathRejected, PathRoots, resolve_inside, resolve_local_or_hub

# Keys the worker sets itself; a user value is replaced (see plan.py).
WORKER_OWNED_KEYS = ("output_dir", "dataset_prepared_path")
# Not Axolotl options, but read by the worker from `args` (publishing).
WORKER_READ_KEYS = frozenset({"hub_private_repo"})
DATASET_LIST_KEYS = ("datasets", "test_datasets", "pretraining_dataset")
# Read by the worker from a dataset entry: rows inline in the request (written to
# the run directory as JSON Lines before Axolotl sees them).
INLINE_ROWS_KEY = "rows"
MAX_INLINE_ROWS = 100_000
# Keys holding a model or tokenizer location: a Hub id or a local directory.
MODEL_PATH_KEYS = ("base_model", "base_model_config", "tokenizer_config", "processor_config")
# Keys that must point at local files or directories.
LOCAL_PATH_KEYS = ("lora_model_dir", "resume_from_checkpoint", "deepspeed")
QUANTISED_LOADING = {
    "load_in_4bit": ("4-bit loading", "bitsandbytes"),
    "load_in_8bit": ("8-bit loading", "bitsandbytes"),
    "gptq": ("GPTQ", "GPTQ kernels"),
}
NO_GPU_FIX = "use adapter: lora without quantised loading, or run on a GPU worker"


@dataclass(frozen=True)
class ArgsContext:
    roots: PathRoots
    hardware: Hardware
    allow_trust_remote_code: bool = False


def check_args(args: dict[str, Any], ctx: ArgsContext) -> tuple[dict[str, Any], list[Problem]]:
    """Return `args` with local paths made absolute, and every problem found."""
    args = copy.deepcopy(args)
    problems: list[Problem] = []
    problems += resolve_presets(args)
    problems += _shape_problems(args)
    bad_datasets = _dataset_problems(args, ctx)
    problems += [p for _, p in bad_datasets]
    problems += _unknown_key_problems(args)
    problems += _plugin_problems(args)
    problems += _remote_code_problems(args, ctx)
    problems += _model_path_problems(args, ctx)
    problems += _hardware_problems(args, ctx.hardware)
    problems += combination_problems(args, ctx.hardware.has_gpu)
    problems += _publish_problems(args)
    if not any(p.path in ("args.datasets", "args.plugins") for p in problems):
        problems += _schema_problems(args, {loc for loc, _ in bad_datasets})
    return args, problems


def _shape_problems(args: dict) -> list[Problem]:
    problems = []
    for key in DATASET_LIST_KEYS:
        value = args.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not value:
            problems.append(Problem(f"args.{key}", "must be a non-empty list of dataset objects"))
        elif not all(isinstance(item, dict) for item in value):
            problems.append(Problem(f"args.{key}", "every entry must be an object like {\"path\": ..., \"type\": ...}"))
    return problems


def _dataset_entries(args: dict):
    for key in DATASET_LIST_KEYS:
        value = args.get(key)
        if isinstance(value, list):
            for index, entry in enumerate(value):
                if isinstance(entry, dict):
                    yield (key, index), entry


def _dataset_problems(args: dict, ctx: ArgsContext) -> list[tuple[tuple[str, int], Problem]]:
    found = []
    known = sorted(axolotl_schema.dataset_keys())
    rl = args.get("rl")
    for loc, entry in _dataset_entries(args):
        where = f"args.{loc[0]}[{loc[1]}]"
        for key in entry:
            if key not in known and key != INLINE_ROWS_KEY:
                found.append((loc, Problem(f"{where}.{key}", f"unknown field{suggest(key, known)}")))
        kind = entry.get("type")
        if isinstance(kind, str) and not rl and loc[0] != "pretraining_dataset":
            message = axolotl_schema.dataset_type_problem(kind)
            if message:
                found.append((loc, Problem(f"{where}.type", message)))
        elif kind is not None and not isinstance(kind, (str, dict)):
            found.append((loc, Problem(f"{where}.type", "must be a type name or an object of field mappings")))
        if INLINE_ROWS_KEY in entry:
            found += [(loc, p) for p in _inline_rows_problems(entry, where)]
        elif "path" in entry:
            try:
                entry["path"] = resolve_local_or_hub(entry["path"], ctx.roots, remote_ok=True, url_ok=True)
            except PathRejected as exc:
                found.append((loc, Problem(f"{where}.path", str(exc))))
        found += [(loc, p) for p in _data_files_problems(entry, where, ctx)]
        if entry.get("trust_remote_code") and not ctx.allow_trust_remote_code:
            found.append((loc, Problem(f"{where}.trust_remote_code", REMOTE_CODE_MESSAGE)))
    return found


def _inline_rows_problems(entry: dict, where: str) -> list[Problem]:
    rows = entry[INLINE_ROWS_KEY]
    if "path" in entry:
        return [Problem(f"{where}.path", "give either path or rows (inline data), not both")]
    if not isinstance(rows, list) or not rows:
        return [Problem(f"{where}.rows", "must be a non-empty list of row objects, e.g. [{\"instruction\": ..., \"output\": ...}]")]
    if len(rows) > MAX_INLINE_ROWS:
        return [Problem(f"{where}.rows", f"{len(rows)} rows; at most {MAX_INLINE_ROWS} inline, put larger datasets on the volume or the Hub")]
    bad = next((index for index, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        return [Problem(f"{where}.rows[{bad}]", "must be an object with the fields of the dataset type")]
    return []


def _data_files_problems(entry: dict, where: str, ctx: ArgsContext) -> list[Problem]:
    files = entry.get("data_files")
    if files is None:
        return []
    values = files if isinstance(files, list) else [files]
    problems, resolved = [], []
    for index, value in enumerate(values):
        try:
            resolved.append(resolve_local_or_hub(value, ctx.roots, remote_ok=True))
        except PathRejected as exc:
            suffix = f"[{index}]" if isinstance(files, list) else ""
            problems.append(Problem(f"{where}.data_files{suffix}", str(exc)))
    if not problems:
        entry["data_files"] = resolved if isinstance(files, list) else resolved[0]
    return problems


def _unknown_key_problems(args: dict) -> list[Problem]:
    plugins = tuple(p for p in _plugin_list(args) if axolotl_schema.plugin_problem(p) is None)
    known = axolotl_schema.known_keys(plugins) | WORKER_READ_KEYS
    return [
        Problem(f"args.{key}", f"unknown option{suggest(key, sorted(known))} (Axolotl would silently ignore it)")
        for key in args
        if key not in known
    ]


def _plugin_list(args: dict) -> list[str]:
    plugins = args.get("plugins")
    return [p for p in plugins if isinstance(p, str)] if isinstance(plugins, list) else []


def _plugin_problems(args: dict) -> list[Problem]:
    plugins = args.get("plugins")
    if plugins is None:
        return []
    if not isinstance(plugins, list):
        return [Problem("args.plugins", "must be a list of plugin class paths")]
    problems = []
    for index, plugin in enumerate(plugins):
        message = axolotl_schema.plugin_problem(plugin)
        if message:
            problems.append(Problem(f"args.plugins[{index}]", message))
    return problems


REMOTE_CODE_MESSAGE = (
    "running code from a model or dataset repository is disabled on this worker; "
    "the operator can allow it with FINETUNE_ALLOW_TRUST_REMOTE_CODE=1"
)


def _remote_code_problems(args: dict, ctx: ArgsContext) -> list[Problem]:
    if args.get("trust_remote_code") and not ctx.allow_trust_remote_code:
        return [Problem("args.trust_remote_code", REMOTE_CODE_MESSAGE)]
    return []


def _model_path_problems(args: dict, ctx: ArgsContext) -> list[Problem]:
    problems = []
    for key in MODEL_PATH_KEYS + LOCAL_PATH_KEYS:
        value = args.get(key)
        if value is None or (key == "deepspeed" and isinstance(value, dict)):
            continue
        if key == "deepspeed" and str(value).startswith(str(PRESET_DIR)):
            continue  # a preset shipped with the worker
        resolve = resolve_inside if key in LOCAL_PATH_KEYS else resolve_local_or_hub
        try:
            args[key] = resolve(value, ctx.roots)
        except PathRejected as exc:
            problems.append(Problem(f"args.{key}", str(exc)))
    return problems


def _publish_problems(args: dict) -> list[Problem]:
    problems = []
    repo = args.get("hub_model_id")
    if repo is not None and not (isinstance(repo, str) and re.match(HUB_REPO_ID, repo)):
        problems.append(Problem("args.hub_model_id", "must be a Hub repo id like 'owner/name' (your user or one of your organisations)"))
    if "hub_private_repo" in args and not isinstance(args["hub_private_repo"], bool):
        problems.append(Problem("args.hub_private_repo", "must be true or false"))
    return problems


def _hardware_problems(args: dict, hardware: Hardware) -> list[Problem]:
    if hardware.has_gpu:
        return []
    problems = [
        Problem(f"args.{key}", f"{what} needs a CUDA GPU ({library}) and this worker has none; {NO_GPU_FIX}")
        for key, (what, library) in QUANTISED_LOADING.items()
        if args.get(key)
    ]
    if args.get("adapter") == "qlora":
        problems.append(Problem("args.adapter", f"qlora needs a CUDA GPU and this worker has none; {NO_GPU_FIX}"))
    return problems


def _without_inline_rows(entry: Any) -> Any:
    if not isinstance(entry, dict) or INLINE_ROWS_KEY not in entry:
        return entry
    rest = {k: v for k, v in entry.items() if k != INLINE_ROWS_KEY}
    return {**rest, "path": "inline/rows", "ds_type": "json"}


# Stands in for a dataset entry already reported as broken, so that Axolotl still
# validates the rest of the config (its validators stop at a missing `datasets`).
PLACEHOLDER_DATASET = {"path": "placeholder/dataset", "type": "alpaca"}


def _schema_problems(args: dict, bad_datasets: set[tuple[str, int]]) -> list[Problem]:
    """Axolotl's validation over the config, minus dataset entries already reported."""
    candidate = {k: v for k, v in args.items() if k not in WORKER_OWNED_KEYS and k not in WORKER_READ_KEYS}
    for key, entries in list(candidate.items()):
        if key in DATASET_LIST_KEYS and isinstance(entries, list):
            candidate[key] = [_without_inline_rows(entry) for entry in entries]
    for key, index in bad_datasets:
        candidate[key] = list(candidate[key])
        candidate[key][index] = dict(PLACEHOLDER_DATASET)
    reported = tuple(f"args.{key}[{index}]" for key, index in bad_datasets)
    plugins = tuple(p for p in _plugin_list(args) if axolotl_schema.plugin_problem(p) is None)  # others are reported already
    return [p for p in axolotl_schema.schema_problems(candidate, plugins) if not p.path.startswith(reported)]
