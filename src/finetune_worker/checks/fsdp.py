"""FSDP1 configs carried over to FSDP2, the only FSDP that Axolotl 0.20 and later run.

Configs written for Axolotl up to 0.19 (its own examples, RunPod's and dstack's guides)
use FSDP1's forms: a top-level `fsdp:` list of strategies, `fsdp_version: 1`, and
`fsdp_config` keys with an `fsdp_` prefix, some of them FSDP1-only. Axolotl 0.21 refuses
the list, the version and `sharding_strategy`/`forward_prefetch`, and silently drops
what its FSDP2 model lacks. Each form is translated here into its FSDP2 equivalent, the
way accelerate's own `accelerate to-fsdp2` maps them, with one note per change naming
the old and the new key. Only what has no FSDP2 equivalent is refused (NO_SHARD: that
is DDP), with what to write instead.
"""

from __future__ import annotations

from typing import Any

from finetune_worker.contract.errors import Problem

# FSDP1 sharding strategy -> FSDP2's reshard_after_forward (accelerate's to_fsdp2 mapping).
# Hybrid sharding (replicate across nodes, shard within one) is FSDP2's dp_replicate_size.
RESHARD_AFTER_FORWARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "HYBRID_SHARD": True, "HYBRID_SHARD_ZERO2": False}
# FSDP1 also took the strategy as torch's enum value.
STRATEGY_NUMBERS = {1: "FULL_SHARD", 2: "SHARD_GRAD_OP", 3: "NO_SHARD", 4: "HYBRID_SHARD", 5: "HYBRID_SHARD_ZERO2"}
NO_SHARD_FIX = (
    "NO_SHARD keeps a full copy of the model on every GPU, which is DDP and has no FSDP2 equivalent; "
    "remove fsdp and fsdp_config to train with DDP (one process per GPU), or use reshard_after_forward: false "
    "(FSDP2 that shards but keeps parameters gathered between forward and backward)"
)
# FSDP1 options that FSDP2 does without, and why dropping them keeps the training the same.
DROPPED = {
    "sync_module_states": "FSDP2 broadcasts rank 0's weights itself when cpu_ram_efficient_loading is on",
    "use_orig_params": "FSDP2 always keeps the original parameters",
    "backward_prefetch": "FSDP2 prefetches the next all-gather in backward by itself",
    "backward_prefetch_policy": "FSDP2 prefetches the next all-gather in backward by itself",
    "limit_all_gathers": "FSDP2 has no rate limiter to turn on",
    "forward_prefetch": "FSDP2 prefetches the next all-gather in forward by itself",
}
LIST_ITEMS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard", "offload", "auto_wrap")


def translate_fsdp1(args: dict[str, Any], notes: list[str]) -> list[Problem]:
    """Rewrite `args`' FSDP1 forms (in place) as FSDP2; a note per change, problems for
    what cannot be carried over. A config that is FSDP2 already is left as it is."""
    problems: list[Problem] = []
    config = args.get("fsdp_config")
    if "fsdp" in args:
        problems += _from_strategy_list(args, notes)
        config = args.get("fsdp_config")
    if not isinstance(config, dict):
        return problems
    translated = dict(config)
    names = _strip_prefixes(translated, notes)
    problems += _sharding_strategy(translated, names, notes)
    _drop_fsdp1_only(translated, names, notes)
    _layer_classes_as_text(translated, names, notes)
    _state_dict_types(translated, names, notes)
    for new, old in names.items():
        if old != new:
            notes.append(f"args.fsdp_config.{old} is FSDP1's name; it becomes fsdp_config.{new}")
    version = translated.pop("version", translated.get("fsdp_version"))
    if version is not None and str(version).strip() != "2":
        notes.append(f"args.fsdp_config.fsdp_version: {version} is FSDP1, which Axolotl 0.20 removed; the config runs as FSDP2 (fsdp_version: 2)")
    top_version = args.get("fsdp_version")
    if top_version is not None and str(top_version).strip() != "2":
        notes.append(f"args.fsdp_version: {top_version} is FSDP1, which Axolotl 0.20 removed; the config runs as FSDP2 (fsdp_version: 2)")
        args["fsdp_version"] = 2
    if translated != config or version is not None:
        translated["fsdp_version"] = 2
    args["fsdp_config"] = translated
    return problems


def _from_strategy_list(args: dict[str, Any], notes: list[str]) -> list[Problem]:
    """`fsdp: [full_shard, auto_wrap, offload]` (or the same as one string) -> fsdp_config keys."""
    value = args.pop("fsdp")
    items = value.split() if isinstance(value, str) else value
    if not items:
        notes.append("args.fsdp is empty (FSDP1's list of strategies); it is dropped")
        return []
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        return [Problem("args.fsdp", "FSDP1's list of strategies must be a list of names; use fsdp_config (FSDP2) instead")]
    wrong = [item for item in items if item.lower() not in LIST_ITEMS]
    if wrong:
        return [Problem("args.fsdp", f"unknown FSDP1 strategy {wrong[0]!r} (known: {', '.join(LIST_ITEMS)}); use fsdp_config (FSDP2) instead")]
    config = args.get("fsdp_config")
    config = dict(config) if isinstance(config, dict) else {}
    chosen = [item.lower() for item in items]
    strategies = [item.upper() for item in chosen if item.upper() in (*RESHARD_AFTER_FORWARD, "NO_SHARD")]
    if "NO_SHARD" in strategies:
        return [Problem("args.fsdp", NO_SHARD_FIX)]
    changes = []
    if strategies and not _has(config, "sharding_strategy") and not _has(config, "reshard_after_forward"):
        config["reshard_after_forward"] = RESHARD_AFTER_FORWARD[strategies[0]]
        changes.append(f"{strategies[0].lower()} -> fsdp_config.reshard_after_forward: {str(config['reshard_after_forward']).lower()}")
    if "offload" in chosen and not _has(config, "offload_params"):
        config["offload_params"] = True
        changes.append("offload -> fsdp_config.offload_params: true")
    if "auto_wrap" in chosen and not _has(config, "auto_wrap_policy"):
        config["auto_wrap_policy"] = "TRANSFORMER_BASED_WRAP"
        changes.append("auto_wrap -> fsdp_config.auto_wrap_policy: TRANSFORMER_BASED_WRAP")
    config["fsdp_version"] = 2
    args["fsdp_config"] = config
    notes.append(f"args.fsdp: FSDP1's list {items}, which Axolotl 0.20 removed, becomes FSDP2's fsdp_config"
                 + (f" ({'; '.join(changes)})" if changes else ""))
    return []


def _has(config: dict[str, Any], key: str) -> bool:
    return key in config or f"fsdp_{key}" in config


def _strip_prefixes(config: dict[str, Any], notes: list[str]) -> dict[str, str]:
    """FSDP1's `fsdp_<name>` keys renamed `<name>`; returns new name -> the name the user wrote
    (the note for a rename comes last, unless a later step says more about the key)."""
    names = {}
    for key in [k for k in config if isinstance(k, str) and k.startswith("fsdp_") and k != "fsdp_version"]:
        new = key.removeprefix("fsdp_")
        value = config.pop(key)
        if new in config:
            notes.append(f"args.fsdp_config.{key}: FSDP1's name for fsdp_config.{new}, which is also set; {new} is kept")
            continue
        config[new] = value
        names[new] = key
    return names


def _sharding_strategy(config: dict[str, Any], names: dict[str, str], notes: list[str]) -> list[Problem]:
    if "sharding_strategy" not in config:
        return []
    value = config.pop("sharding_strategy")
    where = f"args.fsdp_config.{names.pop('sharding_strategy', 'sharding_strategy')}"
    strategy = STRATEGY_NUMBERS.get(value) if isinstance(value, int) and not isinstance(value, bool) else str(value).strip().upper()
    if strategy == "NO_SHARD":
        return [Problem(where, NO_SHARD_FIX)]
    if strategy not in RESHARD_AFTER_FORWARD:
        return [Problem(where, f"unknown FSDP1 sharding strategy {value!r}; "
                        "use fsdp_config.reshard_after_forward (true shards like FULL_SHARD, false like SHARD_GRAD_OP)")]
    if "reshard_after_forward" in config:
        notes.append(f"{where} {strategy} is FSDP1's; fsdp_config.reshard_after_forward is set too and is kept, so it is dropped")
        return []
    config["reshard_after_forward"] = RESHARD_AFTER_FORWARD[strategy]
    hybrid = " (hybrid sharding across nodes is FSDP2's dp_replicate_size; on one machine it is the same)" if "HYBRID" in strategy else ""
    notes.append(f"{where} {strategy} is FSDP1's; it becomes fsdp_config.reshard_after_forward: "
                 f"{str(config['reshard_after_forward']).lower()}{hybrid}")
    return []


def _drop_fsdp1_only(config: dict[str, Any], names: dict[str, str], notes: list[str]) -> None:
    for key, why in DROPPED.items():
        if key in config:
            del config[key]
            notes.append(f"args.fsdp_config.{names.pop(key, key)} is an FSDP1 option with no FSDP2 equivalent; it is dropped ({why})")


def _layer_classes_as_text(config: dict[str, Any], names: dict[str, str], notes: list[str]) -> None:
    """FSDP2's transformer_layer_cls_to_wrap is one string; accelerate splits it on commas."""
    key = "transformer_layer_cls_to_wrap"
    value = config.get(key)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        config[key] = ",".join(value)
        notes.append(f"args.fsdp_config.{names.pop(key, key)}: the list {value} becomes fsdp_config.{key}: "
                     f"{config[key]!r}, the comma-separated text FSDP2 reads")


def _state_dict_types(config: dict[str, Any], names: dict[str, str], notes: list[str]) -> None:
    for key in ("state_dict_type", "final_state_dict_type"):
        if str(config.get(key, "")).upper() == "LOCAL_STATE_DICT":
            config[key] = "SHARDED_STATE_DICT"
            notes.append(f"args.fsdp_config.{names.pop(key, key)}: LOCAL_STATE_DICT is FSDP1's (FSDP2 cannot save it); "
                         f"it becomes fsdp_config.{key}: SHARDED_STATE_DICT, which FSDP2 saves and resumes from the same way")
