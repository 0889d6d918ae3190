"""Several processes, one per GPU: presets for DeepSpeed and FSDP, and their checks.

Pure: presets are resolved to what Axolotl expects (a DeepSpeed JSON shipped with
the worker, or an `fsdp_config` mapping); the launcher is `accelerate launch`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_worker.contract.errors import Problem

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"
DEEPSPEED_PRESETS = ("zero1", "zero2", "zero3", "zero3_offload")

_FSDP_BASE = {
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # accelerate wraps the model's _no_split_modules
    "state_dict_type": "FULL_STATE_DICT",
    "reshard_after_forward": True,
    "cpu_ram_efficient_loading": True,
    "offload_params": False,
}
FSDP_PRESETS: dict[str, dict[str, Any]] = {
    "full_shard": _FSDP_BASE,
    "full_shard_offload": {**_FSDP_BASE, "offload_params": True},
    # FSDP + QLoRA (Answer.AI): 4-bit base weights sharded across GPUs, LoRA trained.
    # Axolotl 0.19 refused cpu_ram_efficient_loading with 4-bit under FSDP2 (it deadlocked); 0.21 loads
    # 4-bit shards instead (qlora_sharded_model_loading). The preset keeps the proven setting.
    "qlora": {**_FSDP_BASE, "cpu_ram_efficient_loading": False},
}


# The DeepSpeed files Axolotl's docs and examples name (deepspeed_configs/ in its
# repository, /workspace/axolotl/deepspeed_configs/ in its image) -> our presets.
AXOLOTL_DEEPSPEED_FILES = {
    "zero1.json": "zero1",
    "zero1_torch_compile.json": "zero1",
    "zero2.json": "zero2",
    "zero2_torch_compile.json": "zero2",
    "zero3.json": "zero3",
    "zero3_bf16.json": "zero3",
    "zero3_bf16_cpuoffload_params.json": "zero3_offload",
    "zero3_bf16_cpuoffload_all.json": "zero3_offload",
}
AXOLOTL_DEEPSPEED_DIRS = ("deepspeed_configs", "/workspace/axolotl/deepspeed_configs", "axolotl/deepspeed_configs")


def deepspeed_preset_path(name: str) -> Path:
    return PRESET_DIR / "deepspeed" / f"{name}.json"


def shipped_preset(value: Any) -> bool:
    """Whether `value` is exactly one of the DeepSpeed presets shipped with the worker."""
    if not isinstance(value, str):
        return False
    try:
        resolved = Path(value).resolve()
    except (OSError, ValueError):  # a NUL, a name too long: no preset, and the path check refuses it
        return False
    return any(resolved == deepspeed_preset_path(name) for name in DEEPSPEED_PRESETS)


def axolotl_docs_preset(value: str) -> str | None:
    """The preset standing in for a DeepSpeed path from Axolotl's docs, if it is one."""
    folder, _, name = value.rstrip("/").rpartition("/")
    folder = folder.removeprefix("./")
    return AXOLOTL_DEEPSPEED_FILES.get(name) if folder in AXOLOTL_DEEPSPEED_DIRS else None


def resolve_presets(args: dict[str, Any], notes: list[str] | None = None, own_file: Callable[[str], bool] | None = None) -> list[Problem]:
    """Replace preset names in `args` (in place) by what Axolotl reads; return problems.
    A path of Axolotl's DeepSpeed files stays the user's own where `own_file` says the
    user has that file (on the volume); otherwise a preset stands in for it."""
    problems = []
    deepspeed = args.get("deepspeed")
    if (isinstance(deepspeed, str) and deepspeed.endswith(".json") and axolotl_docs_preset(deepspeed)
            and not (own_file and own_file(deepspeed))):
        preset = axolotl_docs_preset(deepspeed)
        args["deepspeed"] = str(deepspeed_preset_path(preset))
        if notes is not None:
            notes.append(f"args.deepspeed: {deepspeed} is a file of Axolotl's repository; the worker's {preset} preset stands in for it")
    elif isinstance(deepspeed, str) and not deepspeed.endswith(".json"):
        if deepspeed in DEEPSPEED_PRESETS:
            args["deepspeed"] = str(deepspeed_preset_path(deepspeed))
        else:
            problems.append(Problem("args.deepspeed", f"unknown preset {deepspeed!r}; use one of {', '.join(DEEPSPEED_PRESETS)}, a .json file in the run or on the volume, or an object"))
    fsdp = args.get("fsdp_config")
    if isinstance(fsdp, str):
        if fsdp in FSDP_PRESETS:
            args["fsdp_config"] = dict(FSDP_PRESETS[fsdp])
            args.setdefault("fsdp_version", 2)
            if fsdp == "qlora" and not (args.get("adapter") == "qlora" and args.get("load_in_4bit")):
                problems.append(Problem("args.fsdp_config", "the qlora preset needs adapter: qlora and load_in_4bit: true"))
        else:
            problems.append(Problem("args.fsdp_config", f"unknown preset {fsdp!r}; use one of {', '.join(FSDP_PRESETS)} or an object of FSDP options"))
    return problems


def combination_problems(args: dict[str, Any], has_gpu: bool, read_deepspeed: bool = True) -> list[Problem]:
    """`read_deepspeed`: False when the path was refused (never open a file the job may not read)."""
    problems = []
    sharded_fsdp = args.get("fsdp_config") or args.get("fsdp")
    if args.get("deepspeed") and sharded_fsdp:
        problems.append(Problem("args.deepspeed", "DeepSpeed and FSDP cannot be used together; keep one of deepspeed or fsdp_config"))
    stage = deepspeed_stage(args.get("deepspeed")) if read_deepspeed else None
    if stage == 3 and args.get("load_in_8bit"):
        problems.append(Problem("args.load_in_8bit", "ZeRO-3 cannot shard 8-bit weights; use deepspeed: zero2, or adapter: qlora with load_in_4bit"))
    if (args.get("deepspeed") or sharded_fsdp) and not has_gpu:
        problems.append(Problem("args.deepspeed" if args.get("deepspeed") else "args.fsdp_config",
                                "DeepSpeed and FSDP need CUDA GPUs and this worker has none; remove deepspeed / fsdp_config, or run on a GPU worker"))
    return problems


def deepspeed_config(value: Any) -> dict:
    """The DeepSpeed config behind `args.deepspeed`: an inline object or a JSON file ({} if neither)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        return {}
    try:  # a name too long or with a NUL (refused by the path check) is no file either
        loaded = json.loads(Path(value).read_text(encoding="utf-8")) if Path(value).is_file() else {}
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def deepspeed_stage(value: Any) -> int | None:
    """The ZeRO stage of a preset path, a JSON file or an inline object."""
    return (deepspeed_config(value).get("zero_optimization") or {}).get("stage")


def deepspeed_offloads(value: Any) -> tuple[bool, bool]:
    """(optimizer offloaded, parameters offloaded) to the CPU."""
    zero = deepspeed_config(value).get("zero_optimization") or {}
    offloaded = lambda key: (zero.get(key) or {}).get("device") not in (None, "none")  # noqa: E731
    return offloaded("offload_optimizer"), offloaded("offload_param")


def process_count(requested: int | None, gpu_count: int) -> int:
    """One process per visible GPU unless the job asks for a number."""
    if requested:
        return requested
    return gpu_count if gpu_count > 1 else 1


def cluster_storage_problems(args: dict[str, Any], shared_volume: bool) -> list[Problem]:
    """Without a volume shared by every node, a checkpoint must be whole on each node: a
    LoRA or QLoRA under DDP is (each node's first process writes the adapter). The
    Trainer writes a full model's weights from the first process of node 0 only, FSDP
    too, and DeepSpeed ZeRO scatters them over every node's disk, so none of these could
    resume after a relaunch."""
    fix = "attach one volume to every node at the same BASE_VOLUME and set FINETUNE_SHARED_VOLUME=1, or train a LoRA or QLoRA"
    if shared_volume:
        return []
    problems = [
        Problem(f"args.{key}", f"{key} across nodes without a shared volume cannot resume: a checkpoint would not be whole on every node; {fix}")
        for key in ("fsdp_config", "fsdp", "deepspeed") if args.get(key)
    ]
    if not args.get("adapter") and not problems:
        problems.append(Problem("args.adapter", "a full fine-tune across nodes without a shared volume cannot resume: only node 0 would "
                                f"hold the weights of a checkpoint; {fix}"))
    return problems
