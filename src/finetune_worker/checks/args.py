"""Check the `args` section (an Axolotl config) before anything is downloaded.

Every problem is collected and reported at once, each with its path in the request
(`args.datasets[0].type`) and a hint. The worker's own rules (paths, plugins,
remote code, hardware) run first; Axolotl's schema runs last over what is left.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_worker.checks import axolotl_schema
from finetune_worker.checks.axolotl_schema import integration_name
from finetune_worker.checks.distributed import DEEPSPEED_PRESETS, combination_problems, resolve_presets, shipped_preset
from finetune_worker.checks.fsdp import translate_fsdp1
from finetune_worker.checks.native import NATIVE_CHECKED_KEY
from finetune_worker.checks.option_history import earlier_release, ignored_note
from finetune_worker.checks.options import (
    ATTENTION_KEYS,
    CLASSIFIED,
    CREDENTIAL_ENV,
    DATASET_LIST_KEYS,
    HUB_KERNEL_MESSAGE,
    INLINE_DATASET_KEYS,
    Kind,
    dataset_fields,
    is_nested,
    kind_of,
    mapping_key_problem,
    names_hub_kernel,
)
from finetune_worker.checks.paths import (
    HUB_ID,
    PathRejected,
    PathRoots,
    resolve_inside,
    resolve_local_or_hub,
    worker_files_problem,
)
from finetune_worker.contract.errors import Problem
from finetune_worker.contract.job import HUB_REPO_ID, HUB_REPO_NAME, suggest
from finetune_worker.host.hardware import Hardware

# Keys the worker sets itself; a user value is replaced (see plan.py).
WORKER_OWNED_KEYS = ("output_dir", "dataset_prepared_path")
# Not Axolotl options, but read by the worker from `args` (publishing).
WORKER_READ_KEYS = frozenset({"hub_private_repo"})
# Read by the worker from a dataset entry: rows inline in the request (written to
# the run directory as JSON Lines before Axolotl sees them).
INLINE_ROWS_KEY = "rows"
MAX_INLINE_ROWS = 100_000
# Integrations that hand the training to a remote service or start servers and
# clone repositories: refused on the worker.
REFUSED_INTEGRATIONS = {
    "hatchery": "it trains on a remote service with its own API key",
    "nemo_gym": "it clones repositories and starts servers from the config",
    "coreweave": "it uploads checkpoints to a bucket with the machine's AWS credentials and sends the environment variable "
                 "the config names as a bearer token to the URL the config names",
    "diffusion_decision": "it loads its datasets with its own loader (local files, Hub and image URLs), past the worker's dataset checks",
}
QUANTISED_LOADING = {
    "load_in_4bit": ("4-bit loading", "bitsandbytes"),
    "load_in_8bit": ("8-bit loading", "bitsandbytes"),
    "gptq": ("GPTQ", "GPTQ kernels"),
}
# Local paths that Axolotl (or the worker's checks) open and read.
READ_OPTIONS = frozenset(name for name, kind in CLASSIFIED.items() if kind is Kind.READ)
NO_GPU_FIX = "use adapter: lora without quantised loading, or run on a GPU worker"
# QAT dtypes (qat.weight_dtype / qat.activation_dtype) whose fake quantisation runs only on CUDA.
GPU_QAT_DTYPES = frozenset({"fp8", "float8", "float8_e4m3fn", "nvfp4", "mxfp4"})


@dataclass(frozen=True)
class ArgsContext:
    roots: PathRoots
    hardware: Hardware
    allow_trust_remote_code: bool = False
    notes: list[str] = field(default_factory=list)  # warnings for the job, filled by check_args
    # A shared endpoint serves many users; a Pod's owner runs only their own config,
    # so there options that contact other services or import code are theirs to use.
    shared: bool = True


def check_args(args: dict[str, Any], ctx: ArgsContext) -> tuple[dict[str, Any], list[Problem]]:
    """Return a copy of `args` with presets and local paths resolved and ignored options
    dropped (the `_resolve_*`/`_drop_*` steps), and every problem found (the pure
    `*_problems` checks)."""
    args = copy.deepcopy(args)
    problems: list[Problem] = []
    problems += resolve_presets(args, ctx.notes, own_file=lambda value: _own_file(value, ctx.roots))
    problems += translate_fsdp1(args, ctx.notes)
    problems += _shape_problems(args)
    _drop_earlier_dataset_fields(args, ctx.notes)
    bad_datasets = _dataset_problems(args) + _resolve_dataset_paths(args, ctx)
    problems += [p for _, p in sorted(bad_datasets, key=lambda found: (DATASET_LIST_KEYS.index(found[0][0]), found[0][1]))]
    _drop_ignored_options(args, ctx.notes)
    problems += _unknown_key_problems(args)
    problems += _plugin_problems(args)
    problems += _option_problems(args, ctx)
    refused_paths = _resolve_model_paths(args, ctx)
    problems += refused_paths
    # A refused path is never read: another user's file answers exactly like a missing one.
    unread = {p.path.removeprefix("args.") for p in refused_paths} & READ_OPTIONS
    problems += _hardware_problems(args, ctx.hardware)
    problems += combination_problems(args, ctx.hardware.has_gpu, read_deepspeed="deepspeed" not in unread)
    problems += _publish_problems(args)
    if not any(p.path in ("args.datasets", "args.plugins") for p in problems):
        readable = {k: v for k, v in args.items() if k not in unread}
        problems += _schema_problems(readable, {loc for loc, _ in bad_datasets}, ctx.hardware)
    return args, problems


def early_path_problems(args: dict[str, Any], roots: PathRoots) -> tuple[list[Problem], dict[str, Any]]:
    """The datasets' and the base model's locations, checked as check_args checks them (on a
    copy): known without Axolotl, so a missing or forbidden path fails fast. Also returns
    that copy, its dataset paths resolved (absolute)."""
    args = copy.deepcopy(args)
    problems = _shape_problems(args)
    if problems:
        return problems, args
    context = ArgsContext(roots=roots, hardware=Hardware())
    problems = [p for _, p in _resolve_dataset_paths(args, context)]
    return problems + _resolve_model_paths({"base_model": args.get("base_model")}, context), args


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


def _dataset_problems(args: dict) -> list[tuple[tuple[str, int], Problem]]:
    found = []
    known = sorted(dataset_fields())
    rl = args.get("rl")
    for loc, entry in _dataset_entries(args):
        where = f"args.{loc[0]}[{loc[1]}]"
        for key in entry:
            if key not in known and key != INLINE_ROWS_KEY:
                found.append((loc, Problem(f"{where}.{key}", f"unknown field{suggest(key, known)}")))
        kind = entry.get("type")
        if isinstance(kind, str) and loc[0] != "pretraining_dataset":
            message = rl_type_problem(kind, str(rl)) if rl else axolotl_schema.dataset_type_problem(kind)
            if message:
                found.append((loc, Problem(f"{where}.type", message)))
        elif kind is not None and not isinstance(kind, (str, dict)):
            found.append((loc, Problem(f"{where}.type", "must be a type name or an object of field mappings")))
        if INLINE_ROWS_KEY in entry:
            found += [(loc, p) for p in _inline_rows_problems(entry, where)]
    return found


def _resolve_dataset_paths(args: dict, ctx: ArgsContext) -> list[tuple[tuple[str, int], Problem]]:
    """Each dataset's `path` and `data_files` made absolute (local) or kept (Hub, URL),
    in place; a path outside what the job may read is a problem."""
    found = []
    for loc, entry in _dataset_entries(args):
        where = f"args.{loc[0]}[{loc[1]}]"
        if INLINE_ROWS_KEY not in entry and "path" in entry:
            try:
                # An https URL only where the worker downloads it under its rules (plan.localise_datasets).
                url_ok = loc[0] in INLINE_DATASET_KEYS
                entry["path"] = resolve_local_or_hub(entry["path"], ctx.roots, remote_ok=True, url_ok=url_ok)
                if message := worker_files_problem(entry["path"], ctx.roots):
                    raise PathRejected(message)
            except PathRejected as exc:
                found.append((loc, Problem(f"{where}.path", str(exc))))
        found += [(loc, p) for p in _resolve_data_files(entry, where, ctx)]
    return found


# Which package of Axolotl's prompt strategies each `rl` loads dataset types from.
RL_STRATEGY_PACKAGES = {"orpo": "orpo", "kto": "kto", "ebft": "ebft"}


def rl_type_problem(type_name: str, rl: str) -> str | None:
    """None when `type` names a transform in Axolotl's own package for this `rl`.

    Axolotl's loader first tries the type's first part as a top-level module, so a
    name that is one (`this.x`) would import it: such names are refused.
    """
    import importlib.util

    family = RL_STRATEGY_PACKAGES.get(rl, "dpo")
    package = f"axolotl.prompt_strategies.{family}"
    parts = type_name.split(".")
    hint = f"a transform of {package} (e.g. chat_template.default, chatml.intel, llama3.argilla_chat)"
    if len(parts) > 2 or not all(part.isidentifier() for part in parts):
        return f"unknown type '{type_name}' for rl: {rl}; use {hint}"
    module, function = parts[0], (parts[1] if len(parts) == 2 else "default")
    try:
        shadowed = importlib.util.find_spec(module) is not None
        found = importlib.util.find_spec(f"{package}.{module}") is not None
    except (ImportError, ValueError):
        shadowed, found = True, False
    if shadowed or not found or not hasattr(importlib.import_module(f"{package}.{module}"), function):
        return f"unknown type '{type_name}' for rl: {rl}; use {hint}"
    return None


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


# `datasets` builders that read local files named in data_files (not Hub repos).
PACKAGED_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "xml", "webdataset", "imagefolder", "audiofolder"})


def _is_hub_repo(path: Any) -> bool:
    """A dataset `path` that names a Hub repo (a local path was made absolute already)."""
    return isinstance(path, str) and bool(HUB_ID.match(path)) and path not in PACKAGED_BUILDERS


def _resolve_data_files(entry: dict, where: str, ctx: ArgsContext) -> list[Problem]:
    """Beside a Hub repo, data_files are file names inside that repo (Axolotl hands them
    to the Hub); otherwise they are local files, confined like every path."""
    files = entry.get("data_files")
    if files is None:
        return []
    values = files if isinstance(files, list) else [files]
    in_repo = _is_hub_repo(entry.get("path"))
    problems, resolved = [], []
    for index, value in enumerate(values):
        suffix = f"[{index}]" if isinstance(files, list) else ""
        try:
            resolved.append(_repo_file(value, entry["path"]) if in_repo else resolve_local_or_hub(value, ctx.roots, remote_ok=True))
            if message := worker_files_problem(resolved[-1], ctx.roots):
                raise PathRejected(message)
        except PathRejected as exc:
            problems.append(Problem(f"{where}.data_files{suffix}", str(exc)))
    if not problems:
        entry["data_files"] = resolved if isinstance(files, list) else resolved[0]
    return problems


def _repo_file(value: Any, repo: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PathRejected("must be a file name inside the dataset repo")
    if value.startswith("/") or "://" in value or ".." in value.split("/") or "\x00" in value:
        raise PathRejected(f"must be a relative file name inside the Hub dataset repo {repo} (e.g. data/train.jsonl)")
    return value


# Options of an Axolotl integration, known only with its plugin listed in `plugins`
# (without it Axolotl ignores them): the plugin each one needs.
PLUGIN_OPTIONS = {"cut_cross_entropy": "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"}
# Names users bring from other trainers, and what Axolotl calls them.
OPTION_ALIASES = {
    "epochs": "num_epochs", "lr": "learning_rate", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "max_seq_length": "sequence_len", "max_seq_len": "sequence_len", "seq_len": "sequence_len", "load_4bit": "load_in_4bit",
    "load_8bit": "load_in_8bit", "model_name_or_path": "base_model", "model_name": "base_model", "lora_rank": "lora_r",
    "gradient_accumulation": "gradient_accumulation_steps", "warmup_ratio_steps": "warmup_ratio",
}


def _is_empty(value: Any) -> bool:
    """null, false, or an empty string, list or object: the same as leaving the option
    out. Not 0 or 0.0 (`lora_dropuot: 0` is a typo to report, not an empty value)."""
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def _drop_ignored_options(args: dict, notes: list[str]) -> None:
    """Unknown options that are empty, options of earlier Axolotl releases, and a
    plugin's option turned off without its plugin: dropped from `args`, with a note."""
    known = axolotl_schema.known_keys(_loadable_plugins(args)) | WORKER_READ_KEYS
    for key in [k for k in args if k not in known]:
        value = args[key]
        if key in PLUGIN_OPTIONS:
            if not _is_empty(value):
                continue  # reported: it needs its plugin
            why = f"is off and belongs to the plugin {PLUGIN_OPTIONS[key]}, which plugins does not list"
        elif release := earlier_release(key):
            why = f"is an option of {release}"
        elif _is_empty(value):
            why = "is empty (null, false or empty)"
        else:
            continue
        del args[key]
        notes.append(ignored_note(f"args.{key}", why))


def _drop_earlier_dataset_fields(args: dict, notes: list[str]) -> None:
    """Dataset entry fields of earlier Axolotl releases (`train_on_split`), and a dataset's
    `trust_remote_code` (datasets 4 and later run no loading scripts: it has no effect),
    dropped with a note."""
    known = dataset_fields()
    for (key, index), entry in list(_dataset_entries(args)):
        if entry.get("trust_remote_code") is not None:
            del entry["trust_remote_code"]
            notes.append(f"args.{key}[{index}].trust_remote_code has no effect: the installed datasets library runs no "
                         "dataset loading scripts (a dataset that needs one cannot be loaded at all); it is dropped")
        for field_name in [f for f in entry if f not in known and f != INLINE_ROWS_KEY]:
            release = earlier_release(f"datasets.{field_name}")
            if release:
                del entry[field_name]
                notes.append(ignored_note(f"args.{key}[{index}].{field_name}", f"is a dataset field of {release}"))


def _unknown_key_problems(args: dict) -> list[Problem]:
    """Typos are errors: Axolotl would drop them silently."""
    known = axolotl_schema.known_keys(_loadable_plugins(args)) | WORKER_READ_KEYS
    problems = []
    for key in [k for k in args if k not in known]:
        if key in PLUGIN_OPTIONS:
            problems.append(Problem(f"args.{key}", f"needs its plugin, which Axolotl loads only when listed: add plugins: [{PLUGIN_OPTIONS[key]}] "
                                    "(without it Axolotl would silently ignore the option), or remove it"))
            continue
        hint = f"; did you mean '{OPTION_ALIASES[key]}'?" if key in OPTION_ALIASES else suggest(key, sorted(known))
        problems.append(Problem(f"args.{key}", f"unknown option{hint} (Axolotl would silently ignore it)"))
    return problems


def _plugin_list(args: dict) -> list[str]:
    plugins = args.get("plugins")
    return [p for p in plugins if isinstance(p, str)] if isinstance(plugins, list) else []


def _loadable_plugins(args: dict) -> tuple[str, ...]:
    """The config's plugins that pass the plugin check (the others are reported by it)."""
    return tuple(p for p in _plugin_list(args) if axolotl_schema.plugin_problem(p) is None)


def _plugin_problems(args: dict) -> list[Problem]:
    plugins = args.get("plugins")
    if plugins is None:
        return []
    if not isinstance(plugins, list):
        return [Problem("args.plugins", "must be a list of plugin class paths")]
    problems = []
    for index, plugin in enumerate(plugins):
        message = axolotl_schema.plugin_problem(plugin)
        integration = integration_name(plugin)
        if not message and integration in REFUSED_INTEGRATIONS:
            message = f"the {integration} integration is not available on this worker: {REFUSED_INTEGRATIONS[integration]}"
        if message:
            problems.append(Problem(f"args.plugins[{index}]", message))
    return problems


REMOTE_CODE_MESSAGE = (
    "running code from a model or dataset repository is disabled on this worker. "
    "Remove it: the installed transformers has Llama, Mistral, Mixtral, Qwen2/3, Gemma, Phi-3, Falcon, Jamba, DBRX, "
    "DeepSeek-V2/V3 and most other architectures built in, so they need no repository code; "
    "if your model really ships its own code, ask the operator to set FINETUNE_ALLOW_TRUST_REMOTE_CODE=1"
)


def _resolve_model_paths(args: dict, ctx: ArgsContext) -> list[Problem]:
    """Model locations (Hub id or confined local directory) and local-only paths, made
    absolute in place; a path outside what the job may read is a problem."""
    problems = []
    for key, value in list(args.items()):
        kind = kind_of(key)
        if value is None or kind not in (Kind.MODEL, Kind.READ) or (key == "deepspeed" and isinstance(value, dict)):
            continue
        if key == "deepspeed" and shipped_preset(value):
            continue
        resolve = resolve_inside if kind is Kind.READ else resolve_local_or_hub
        try:
            args[key] = resolve(value, ctx.roots)
        except PathRejected as exc:
            message = str(exc)
            if key == "deepspeed":
                message += f"; or use a preset shipped with the worker: {', '.join(DEEPSPEED_PRESETS)} (also Axolotl's deepspeed_configs/zero*.json names)"
            problems.append(Problem(f"args.{key}", message))
    return problems


def _option_problems(args: dict, ctx: ArgsContext) -> list[Problem]:
    """Every option checked against what its Kind may touch (see options.py)."""
    problems: list[Problem] = []
    known = axolotl_schema.known_keys(_loadable_plugins(args))

    def visit(node: dict, prefix: str, where: str) -> None:
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            here = f"{where}.{key}"
            if value is None or value is False or key == INLINE_ROWS_KEY and prefix == "datasets":
                continue
            if not prefix and key not in known:
                continue  # an unknown option: reported as such
            kind = kind_of(path)
            if kind is None:
                if is_nested(path) and isinstance(value, dict):
                    visit(value, path, here)
                elif is_nested(path) and isinstance(value, list):
                    for index, item in enumerate(value):
                        if isinstance(item, dict):
                            visit(item, path if key not in DATASET_LIST_KEYS else "datasets", f"{here}[{index}]")
                continue
            # The model's own flag waits for its config.json (checks/native.py): on a model type
            # that transformers implements it is dropped, on any other it is refused there.
            message = None if path == NATIVE_CHECKED_KEY else _kind_problem(kind, key, value, ctx)
            if message:
                problems.append(Problem(here, message))
            if kind is Kind.MAPPING or (kind is Kind.READ and isinstance(value, dict)):
                problems.extend(_mapping_problems(value, here, ctx))
            if kind is Kind.TEMPLATE and isinstance(value, str):
                resolved, message = _template_path(value, ctx)
                if message:
                    problems.append(Problem(here, message))
                elif resolved:
                    node[key] = resolved

    visit(args, "", "args")
    return problems


# Refusals that say more than their option kind's message.
OWN_MESSAGES = {
    "llama_cpp_dir": "names a llama.cpp directory whose code would run; not allowed on a shared worker "
                     "(remove it: the worker exports with its own llama.cpp)",
    "outfile": "must be a plain file name such as model-{ftype}.gguf: the GGUF files are written to the run's output/gguf folder",
}


def _kind_problem(kind: Kind, key: str, value: Any, ctx: ArgsContext) -> str | None:
    if kind is Kind.REMOTE_CODE and not ctx.allow_trust_remote_code:
        return REMOTE_CODE_MESSAGE
    if key in ATTENTION_KEYS and names_hub_kernel(value) and not ctx.allow_trust_remote_code:
        return HUB_KERNEL_MESSAGE  # with use_kernels, Axolotl lets transformers load any Hub repo's kernel
    if kind is Kind.CREDENTIAL:
        env = CREDENTIAL_ENV.get(key)
        instead = f"send it as credentials.{key}" if env else "this integration's credentials are not supported on this worker"
        return f"a credential in args would be stored with the run; {instead}"
    if not ctx.shared and kind in (Kind.NETWORK, Kind.UNSUPPORTED_CODE, Kind.UNCLASSIFIED, Kind.FILE_NAME):
        return None
    if kind is Kind.NETWORK:
        return "makes the training contact a service at an address the config names; not allowed on this worker (remove it)"
    if kind is Kind.UNSUPPORTED_CODE:
        return OWN_MESSAGES.get(key, "imports code the config names; not allowed on a shared worker (remove it)")
    if kind is Kind.UNCLASSIFIED:
        return "this Axolotl option is not yet classified by the worker's security rules, so it is refused; remove it or ask the operator to update the worker"
    if kind is Kind.HUB and not (isinstance(value, str) and HUB_ID.match(value)):
        return "must be a Hugging Face Hub repo id like 'owner/name'"
    if kind is Kind.FILE_NAME and not (isinstance(value, str) and value not in (".", "..") and re.fullmatch(r"[A-Za-z0-9._{}-]+", value)):
        return OWN_MESSAGES.get(key, "must be a plain file name (it is created and deleted inside the run's output directory)")
    if kind is Kind.CODE and key == "input_transform" and not _messages_transform_exists(value):
        return "unknown input_transform; use one of Axolotl's messages transforms (e.g. chat)"
    return None


def _messages_transform_exists(value: Any) -> bool:
    import importlib.util

    return isinstance(value, str) and value.isidentifier() and importlib.util.find_spec(f"axolotl.prompt_strategies.messages.{value}") is not None


def _mapping_problems(value: Any, where: str, ctx: ArgsContext) -> list[Problem]:
    """Keys refused anywhere inside a free-form mapping (remote code, credentials, paths)."""
    problems = []
    if isinstance(value, dict):
        for key, item in value.items():
            found = mapping_key_problem(key, item)
            waived = found is not None and (
                (found[0] is Kind.REMOTE_CODE and ctx.allow_trust_remote_code) or (found[0] is Kind.READ and not ctx.shared)
            )
            if found and not waived:
                problems.append(Problem(f"{where}.{key}", found[1]))
            else:
                problems.extend(_mapping_problems(item, f"{where}.{key}", ctx))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            problems.extend(_mapping_problems(item, f"{where}[{index}]", ctx))
    return problems


def _own_file(value: str, roots: PathRoots) -> bool:
    """Whether `value` names a file the job may read (the user's, on the volume)."""
    try:
        return Path(resolve_inside(value, roots)).is_file()
    except PathRejected:
        return False


def _exists(value: str) -> bool:
    try:
        return Path(value).exists()
    except (OSError, ValueError):  # a NUL byte, a name too long
        return False


def _template_path(value: str, ctx: ArgsContext) -> tuple[str | None, str | None]:
    """Axolotl reads `chat_template_jinja` as a file when the string names one: such a
    value must be a file the job may read. Inline templates (with `{`) stay as they are."""
    if "{" in value and "\n" in value:
        return None, None
    if "{" in value and not _exists(value):
        return None, None
    try:
        resolved = resolve_inside(value, ctx.roots)
    except PathRejected as exc:
        return None, f"names a template file that cannot be used: {exc}; or give the Jinja template inline"
    return resolved, None


def _publish_problems(args: dict) -> list[Problem]:
    problems = []
    repo = args.get("hub_model_id")
    if repo is not None and not (isinstance(repo, str) and (re.match(HUB_REPO_ID, repo) or re.match(HUB_REPO_NAME, repo))):
        problems.append(Problem("args.hub_model_id", "must be a Hub repo id like 'owner/name' (your user or one of your organisations), or a name for a repo of the token's user"))
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
    qat = args.get("qat")
    if isinstance(qat, dict):
        for key in ("weight_dtype", "activation_dtype"):
            if isinstance(qat.get(key), str) and qat[key] in GPU_QAT_DTYPES:
                problems.append(Problem(f"args.qat.{key}", f"{qat[key]} fake quantisation needs a CUDA GPU (torchao's low-precision kernels) "
                                        "and this worker has none; remove qat, or run on a GPU worker"))
    for key in ("context_parallel_size", "sequence_parallel_degree"):
        size = args.get(key)
        if isinstance(size, int) and not isinstance(size, bool) and size > 1:
            problems.append(Problem(f"args.{key}", "context parallelism splits each sequence across GPUs (ring-flash-attention) and this "
                                    f"worker has none; remove {key}, or run on a GPU worker with at least {size} GPUs"))
    return problems


def _without_inline_rows(entry: Any) -> Any:
    if not isinstance(entry, dict) or INLINE_ROWS_KEY not in entry:
        return entry
    rest = {k: v for k, v in entry.items() if k != INLINE_ROWS_KEY}
    return {**rest, "path": "inline/rows", "ds_type": "json"}


# Stands in for a dataset entry already reported as broken, so that Axolotl still
# validates the rest of the config (its validators stop at a missing `datasets`).
PLACEHOLDER_DATASET = {"path": "placeholder/dataset", "type": "alpaca"}


def _schema_problems(args: dict, bad_datasets: set[tuple[str, int]], hardware: Hardware) -> list[Problem]:
    """Axolotl's validation over the config with this worker's GPU capabilities, minus
    dataset entries already reported."""
    candidate = {k: v for k, v in args.items() if k not in WORKER_OWNED_KEYS and k not in WORKER_READ_KEYS}
    for key, entries in list(candidate.items()):
        if key in DATASET_LIST_KEYS and isinstance(entries, list):
            candidate[key] = [_without_inline_rows(entry) for entry in entries]
    for key, index in bad_datasets:
        candidate[key] = list(candidate[key])
        candidate[key][index] = dict(PLACEHOLDER_DATASET)
    reported = tuple(f"args.{key}[{index}]" for key, index in bad_datasets)
    plugins = _loadable_plugins(args)  # others are reported already
    return [p for p in axolotl_schema.schema_problems(candidate, plugins, hardware) if not p.path.startswith(reported)]
