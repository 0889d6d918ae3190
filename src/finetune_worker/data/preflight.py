"""Preflight: load and tokenize the datasets exactly as `axolotl train` would, and report.

Runs in a child process, on the run's config.yaml (the one training would use):

    python -m finetune_worker.data.preflight config.yaml --out preflight.json [--standby]

With --standby it imports what it needs first and waits for "go" on stdin (the worker
starts it at job receipt, before config.yaml exists, so Axolotl's imports overlap the
worker's own validation: run/standby.py does the same for training).

It loads the tokenizer (not the model weights), tokenizes each dataset with
Axolotl's own prompt strategies, and measures it; then it runs Axolotl's own
dataset preparation, which saves the prepared dataset into the shared cache that a
training with the same data and config loads instead of tokenizing again.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from finetune_worker.host.children import told_to_go
from finetune_worker.host.fastexit import exit_without_teardown

IGNORED_LABEL = -100
EXAMPLES_PER_DATASET = 2
MAX_EXAMPLE_CHARS = 2000


def render_example(input_ids: list[int], labels: list[int], decode) -> str:
    """The example's text with the trained-on spans (labels kept) inside [[...]]."""
    parts = []
    for trained, group in itertools.groupby(zip(input_ids, labels, strict=True), key=lambda pair: pair[1] != IGNORED_LABEL):
        text = decode([token for token, _ in group])
        parts.append(f"[[{text}]]" if trained else text)
    rendered = "".join(parts)
    return rendered if len(rendered) <= MAX_EXAMPLE_CHARS else rendered[:MAX_EXAMPLE_CHARS] + " …"


def token_stats(lengths: list[int], trained: list[int]) -> dict:
    if not lengths:
        return {"total": 0, "trained": 0, "min": None, "median": None, "max": None}
    return {
        "total": sum(lengths),
        "trained": sum(trained),
        "min": min(lengths),
        "median": statistics.median(lengths),
        "max": max(lengths),
    }


def length_outcome(lengths: list[int], sequence_len: int, min_len: int, strategy: str) -> dict:
    """What Axolotl's handle_long_seq_in_dataset will do with these lengths."""
    too_long = sum(length > sequence_len for length in lengths)
    too_short = sum(length < min_len for length in lengths)
    truncating = strategy == "truncate"
    return {
        "too_long": too_long,
        "too_short": too_short,
        "dropped": too_short + (0 if truncating else too_long),
        "truncated": too_long if truncating else 0,
    }


def packing_efficiency(lengths: list[int], sequence_len: int, min_len: int = 2, bin_size: int = 200) -> dict:
    """Share of each packed sequence filled with tokens, by Axolotl's own FFD packer."""
    import numpy as np
    from axolotl.utils.samplers.multipack import pack_group

    kept = np.array(sorted((n for n in lengths if min_len <= n <= sequence_len), reverse=True), dtype=np.int64)
    if not len(kept):
        return {"bins": 0, "efficiency": None}
    bins = pack_group(kept, 0, sequence_len, len(kept), bin_size, False)
    return {"bins": len(bins), "efficiency": round(float(kept.sum()) / (len(bins) * sequence_len), 4)}


LENGTH_BUCKET = 64  # tokens per bucket of the length histogram (Axolotl pads batches to a multiple of 64)


def length_summary(lengths: list[int], sequence_len: int, min_len: int = 2) -> dict:
    """What the time estimate needs of a split: rows, tokens, the sum of squared lengths (the
    attention term), a histogram of 64-token buckets (padding), and the bins Axolotl's packer
    would make at sequence_len, whether or not this config packs (a GPU's fast defaults may)."""
    histogram = [0] * max(1, -(-max(lengths, default=0) // LENGTH_BUCKET))
    for length in lengths:
        histogram[max(length - 1, 0) // LENGTH_BUCKET] += 1
    return {
        "rows": len(lengths),
        "tokens": int(sum(lengths)),
        "sum_squares": int(sum(length * length for length in lengths)),
        "histogram": histogram if lengths else [],
        "if_packed": packing_efficiency(lengths, sequence_len, min_len) if lengths else {"bins": 0, "efficiency": None},
    }


def split_lengths(dataset, cfg) -> dict | None:
    """The prepared split's lengths, as Axolotl's samplers read them."""
    if dataset is None:
        return None
    from axolotl.utils.samplers.utils import get_dataset_lengths

    return length_summary([int(n) for n in get_dataset_lengths(dataset)], cfg.sequence_len, cfg.min_sample_len or 2)


def describe_dataset(where: str, entry: dict, dataset, cfg, decode) -> tuple[dict, list[int], list[int]]:
    lengths = [len(ids) for ids in dataset["input_ids"]]
    labels = dataset["labels"] if "labels" in dataset.column_names else dataset["input_ids"]
    trained = [sum(label != IGNORED_LABEL for label in row) for row in labels]
    outcome = length_outcome(lengths, cfg.sequence_len, cfg.min_sample_len or 2, (cfg.excess_length_strategy or "drop").lower())
    examples = [
        {
            "dataset": where,
            "row": index,
            "tokens": lengths[index],
            "trained_tokens": trained[index],
            "text": render_example(dataset[index]["input_ids"], labels[index], decode),
        }
        for index in range(min(EXAMPLES_PER_DATASET, len(lengths)))
    ]
    report = {
        "where": where,
        "path": str(entry.get("path")),
        "type": entry.get("type"),
        "rows_read": len(lengths),
        "rows_kept": len(lengths) - outcome["dropped"],
        **outcome,
        "no_trained_tokens": sum(count == 0 for count in trained),
        "tokens": token_stats(lengths, trained),
        "examples": examples,
    }
    return report, lengths, trained


def preflight(config_path: Path) -> dict:
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.data.sft import _load_and_process_single_dataset  # pinned Axolotl: one dataset, tokenized
    from axolotl.utils.data.shared import datasets_with_name_generator

    cfg = load_cfg(str(config_path))
    tokenizer = load_tokenizer(cfg)
    if cfg.rl:
        return preference_preflight(cfg, tokenizer)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    reports, train_lengths, all_lengths, all_trained = [], [], [], []
    for list_key, split in (("datasets", "train"), ("test_datasets", "test")):
        for index, entry in enumerate(datasets_with_name_generator(cfg[list_key] or [])):
            dataset, _ = _load_and_process_single_dataset(entry, cfg, tokenizer, split, cfg.seed)
            report, lengths, trained = describe_dataset(f"args.{list_key}[{index}]", dict(entry), dataset, cfg, decode)
            reports.append(report)
            all_lengths += lengths
            all_trained += trained
            if split == "train":
                train_lengths += lengths

    meta = load_datasets(cfg=cfg)
    prepared = {
        "train_rows": len(meta.train_dataset) if meta.train_dataset is not None else 0,
        "eval_rows": len(meta.eval_dataset) if meta.eval_dataset is not None else 0,
        "total_num_steps": meta.total_num_steps,
        "cache_dir": str(cfg.dataset_prepared_path),
    }
    return {
        "train": split_lengths(meta.train_dataset, cfg),
        "eval": split_lengths(meta.eval_dataset, cfg),
        "sequence_len": cfg.sequence_len,
        "excess_length_strategy": cfg.excess_length_strategy or "drop",
        "train_on_inputs": bool(cfg.train_on_inputs),
        "tokenizer": str(cfg.tokenizer_config or cfg.base_model),
        "datasets": reports,
        "total": {**overall(reports), "tokens": token_stats(all_lengths, all_trained)},
        "prepared": prepared,
        "packing": {"enabled": True, **packing_efficiency(train_lengths, cfg.sequence_len, cfg.min_sample_len or 2)} if cfg.sample_packing else {"enabled": False},
        "examples": [example for report in reports for example in report.pop("examples")],
    }


# -- preference datasets (rl) ---------------------------------------------------------
#
# Axolotl 0.21 (axolotl/utils/data/rl.py `_load_split`) loads each dataset, maps it with
# its type's transform into prompt/chosen/rejected (KTO: prompt/completion) text, and
# measures each part with the tokenizer (no special tokens): a pair whose prompt plus
# chosen, or prompt plus rejected, is longer than sequence_len is dropped (the default),
# truncated to fit (`excess_length_strategy: truncate`, dropped still when the prompt
# alone is too long) or stops the run (`raise`). The same steps here, counted.

PREFERENCE_PARTS = {"kto": ("prompt", "completion")}
PAIR_PARTS = ("prompt", "chosen", "rejected")


def rl_name(cfg) -> str:
    """`rl` as the user wrote it (Axolotl's config holds an RLType enum)."""
    return str(getattr(cfg.rl, "value", cfg.rl))


def preference_parts(rl: str) -> tuple[str, ...]:
    return PREFERENCE_PARTS.get(rl, PAIR_PARTS)


def preference_outcome(parts: dict[str, list[int]], sequence_len: int, strategy: str) -> dict:
    """How many rows rl.py's length filter finds too long, and what it does with them."""
    prompts = parts["prompt"]
    answers = [values for name, values in parts.items() if name != "prompt"]
    too_long = [any(prompt + answer[i] > sequence_len for answer in answers) for i, prompt in enumerate(prompts)]
    prompt_too_long = [prompt >= sequence_len for prompt in prompts]  # nothing left for the answer
    count = sum(too_long)
    if strategy == "truncate":
        dropped = sum(long and short for long, short in zip(too_long, prompt_too_long, strict=True))
        return {"too_long": count, "dropped": dropped, "truncated": count - dropped, "prompt_too_long": sum(prompt_too_long)}
    return {"too_long": count, "dropped": count if strategy == "drop" else 0, "truncated": 0, "prompt_too_long": sum(prompt_too_long)}


def transformed_preference_dataset(cfg, entry, index: int, tokenizer, split: str):
    """One dataset, loaded and mapped by its type's transform as rl.py's `_load_split` does."""
    from axolotl.prompt_strategies.dpo import load as load_dpo
    from axolotl.prompt_strategies.kto import load as load_kto
    from axolotl.prompt_strategies.orpo import load as load_orpo
    from axolotl.utils.data.rl import _map_dataset  # pinned Axolotl: the same map as training
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.dict import DictDefault

    dataset = load_dataset_with_config(entry, cfg.hf_use_auth_token, streaming=False)
    kind = entry["type"]
    if not kind:
        return dataset
    if isinstance(kind, DictDefault):
        kind = "user_defined.default"
    load = {"orpo": load_orpo, "kto": load_kto}.get(rl_name(cfg), load_dpo)
    transform = load(kind, cfg, dataset_idx=index)
    if transform is None:
        raise ValueError(f"Failed to load dataset transform function for type {kind!r} (rl: {cfg.rl})")
    map_kwargs: dict = {}
    if isinstance(transform, tuple):
        transform, map_kwargs = transform
    names = getattr(dataset, "column_names", None)
    columns = names if isinstance(names, list) else (names or {}).get(split, [])  # a DatasetDict: its split's
    if "remove_columns" in map_kwargs:
        wanted = map_kwargs["remove_columns"]
        map_kwargs["remove_columns"] = list(columns) if wanted == "__all__" else [c for c in wanted if c in columns]
    return _map_dataset(cfg, dataset, transform, tokenizer, **map_kwargs)


def describe_preference_dataset(where: str, entry: dict, dataset, cfg, tokenizer) -> dict:
    rl = rl_name(cfg)
    names = preference_parts(rl)
    texts = {name: dataset[name] for name in names}

    def count(text) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    parts = {name: [count(text) for text in values] for name, values in texts.items()}
    strategy = (cfg.excess_length_strategy or "drop").lower()
    outcome = preference_outcome(parts, cfg.sequence_len, strategy)
    rows = len(parts["prompt"])
    longest = [max(parts["prompt"][i] + parts[name][i] for name in names[1:]) for i in range(rows)]
    examples = [
        {"dataset": where, "row": i, "tokens": longest[i],
         **{name: _clip(str(texts[name][i])) for name in names}, **{f"{name}_tokens": parts[name][i] for name in names}}
        for i in range(min(EXAMPLES_PER_DATASET, rows))
    ]
    return {
        "where": where,
        "path": str(entry.get("path")),
        "type": entry.get("type"),
        "rl": rl,
        "rows_read": rows,
        "rows_kept": rows - outcome["dropped"],
        "too_short": 0,
        "no_trained_tokens": 0,
        **outcome,
        "tokens": {name: _stats(values) for name, values in parts.items()},
        "longest_pair": _stats(longest),
        "examples": examples,
    }


def _stats(lengths: list[int]) -> dict:
    return {key: value for key, value in token_stats(lengths, lengths).items() if key != "trained"}


def _clip(text: str) -> str:
    return text if len(text) <= MAX_EXAMPLE_CHARS else text[:MAX_EXAMPLE_CHARS] + " …"


def preference_preflight(cfg, tokenizer) -> dict:
    from axolotl.common.datasets import load_preference_datasets
    from axolotl.utils.data.shared import datasets_with_name_generator

    reports = []
    for list_key, split in (("datasets", "train"), ("test_datasets", "test")):
        for index, entry in enumerate(datasets_with_name_generator(cfg[list_key] or [])):
            dataset = transformed_preference_dataset(cfg, entry, index, tokenizer, split)
            reports.append(describe_preference_dataset(f"args.{list_key}[{index}]", dict(entry), dataset, cfg, tokenizer))

    meta = load_preference_datasets(cfg=cfg)  # what training loads; saved to the prepared-data cache
    prepared = {
        "train_rows": len(meta.train_dataset) if meta.train_dataset is not None else 0,
        "eval_rows": len(meta.eval_dataset) if meta.eval_dataset is not None else 0,
        "total_num_steps": meta.total_num_steps,
        "cache_dir": str(cfg.dataset_prepared_path),
    }
    names = preference_parts(rl_name(cfg))
    examples = [example for report in reports for example in report.pop("examples")]
    return {
        "rl": rl_name(cfg),
        "sequence_len": cfg.sequence_len,
        "excess_length_strategy": cfg.excess_length_strategy or "drop",
        "tokenizer": str(cfg.tokenizer_config or cfg.base_model),
        "datasets": reports,
        "total": {
            **overall(reports),
            "prompt_too_long": sum(r["prompt_too_long"] for r in reports),
            "tokens": {name: _merged([r["tokens"][name] for r in reports]) for name in names},
        },
        "prepared": prepared,
        "packing": {"enabled": False},
        "examples": examples,
    }


def _merged(stats: list[dict]) -> dict:
    present = [s for s in stats if s["min"] is not None]
    if not present:
        return _stats([])
    return {"total": sum(s["total"] for s in present), "min": min(s["min"] for s in present), "max": max(s["max"] for s in present)}


def overall(reports: list[dict]) -> dict:
    counts = ("rows_read", "rows_kept", "too_long", "too_short", "dropped", "truncated", "no_trained_tokens")
    return {key: sum(r[key] for r in reports) for key in counts}


def preload() -> None:
    """What preflight() imports, imported before its config exists (a standby)."""
    import axolotl.cli.config  # noqa: F401
    import axolotl.common.datasets  # noqa: F401
    import axolotl.loaders  # noqa: F401
    import axolotl.utils.data.sft  # noqa: F401
    import axolotl.utils.samplers.multipack  # noqa: F401

    warm_packer()


def warm_packer() -> None:
    """Have numba compile Axolotl's packer (about 1 s) while waiting for "go", not after it:
    split_lengths calls it for every preflight and at every training's start."""
    packing_efficiency([3, 5, 9, 2], 16)


def save_one_process_datasets_in_this_process() -> None:
    """A `save_to_disk(num_proc=1)` writes its shards here instead of in a pool of one.

    datasets 5.0.1 starts a `spawn` pool and a manager for any `num_proc >= 1`: two new
    interpreters that import datasets, about 2 s on 2 cores, whatever the size. Axolotl
    (0.21, `save_preprocessed_dataset`) always passes at least 1 (one process per 256
    rows), so every preflight and every training that tokenizes paid it. With
    `num_proc=None` datasets runs the same `_save_to_disk_single` over the same shards in
    this process: the same files. Larger `num_proc` values keep their pool.
    """
    from datasets import Dataset

    save_to_disk = Dataset.save_to_disk
    if getattr(save_to_disk, "one_process_in_place", False):
        return
    signature = inspect.signature(save_to_disk)

    @functools.wraps(save_to_disk)
    def save_in_place_when_one(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if bound.arguments.get("num_proc") == 1:
            bound.arguments["num_proc"] = None
        return save_to_disk(*bound.args, **bound.kwargs)

    save_in_place_when_one.one_process_in_place = True
    Dataset.save_to_disk = save_in_place_when_one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_worker.data.preflight")
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--standby", action="store_true", help="import first, then wait for 'go' on stdin")
    options = parser.parse_args(argv)
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    if options.standby:
        started = time.monotonic()
        preload()
        if not told_to_go(started):
            return 0
    report = preflight(options.config)
    options.out.write_text(json.dumps(report, default=_plain), encoding="utf-8")
    return 0


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


if __name__ == "__main__":
    exit_without_teardown(main())  # a failure raises past this and exits as usual
