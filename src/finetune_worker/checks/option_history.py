"""Option names of earlier Axolotl releases, told apart from typos.

A config written for an earlier Axolotl may carry options the installed one no longer
has; Axolotl drops them silently, so the worker drops them too, with a note, and
refuses only names that no release ever had (with a did-you-mean). The names come from
`axolotl_option_history.json`: every option of every released schema (0.5.2 on), built
by `builder/axolotl_option_history.py` from the released wheels and sdists. Releases
before 0.5 had no schema; the names their README's config reference and their example
configs used are listed by hand below.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import metadata
from pathlib import Path

HISTORY_FILE = Path(__file__).with_name("axolotl_option_history.json")

# Names of Axolotl before its config schema (0.1-0.4: the README's config reference and
# the example configs), or read by its code without being in any schema; dotted names
# are dataset entry fields. Each is ignored by the current Axolotl.
BEFORE_THE_SCHEMA = frozenset({
    "base_model_ignore_patterns", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "collator_pad_to_longest", "debug",
    "eval_table_max_new_tokens", "gptq_groupsize", "gptq_model_v1", "gptq_bits", "gptq_disable_exllama", "landmark_attention",
    "llm_int8_has_fp16_weight", "log_sweep_max_lr", "log_sweep_min_lr", "lora_out_dir", "use_reentrant", "xpos_rope",
    "adam_eps", "eta_min", "sample_packing_seq_len_multiplier", "test_value", "torch_dtype", "lora_target_linear_modules",
    "full_finetune", "overlap_len", "safe_serialization", "rl_adapter_ref_model", "pretraining_dataset_streaming", "mpt_alibi",
    "chat_template_strategy", "use_cut_cross_entropy",
    "datasets.system_prompt", "datasets.overlap_len",
})


@cache
def option_history() -> dict[str, dict[str, str]]:
    """Option name -> {"first": version, "last": version}, from the released schemas."""
    return json.loads(HISTORY_FILE.read_text(encoding="utf-8"))["options"]


@cache
def installed_axolotl() -> str:
    return metadata.version("axolotl")


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.replace(".post", ".").split(".") if part.isdigit())


def earlier_release(name: str) -> str | None:
    """Which earlier releases had the option `name` (`datasets.<field>` for a dataset
    entry's), when the installed Axolotl no longer does; None for any other name."""
    if name in BEFORE_THE_SCHEMA:
        return "Axolotl before 0.5"
    found = option_history().get(name)
    if found is None or _release(found["last"]) >= _release(installed_axolotl()):
        return None
    first, last = found["first"], found["last"]
    return f"Axolotl {first}" if first == last else f"Axolotl {first} to {last}"


def ignored_note(where: str, why: str) -> str:
    return f"{where} {why}; Axolotl {installed_axolotl()} ignores it, so it is dropped"
