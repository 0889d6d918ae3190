"""On a GPU, what experienced Axolotl users set for speed where the job left it unset."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from finetune_worker.checks.axolotl_schema import integration_name
from finetune_worker.host.hardware import Hardware
from finetune_worker.plan.config import AxolotlPlan


@dataclass(frozen=True)
class Speedups:
    """What the GPU worker's image offers, found by the pipeline (cheap checks, no imports)."""

    flash_attn: bool = False
    liger: bool = False
    model_type: str | None = None
    fits_without_checkpointing: bool = True


@dataclass(frozen=True)
class FastDefaults:
    """What `apply_fast_defaults` set ("key: value", for a status event), and a note for
    each default it left out because Axolotl refuses it with this config (for a warning)."""

    chosen: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
LIGER_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "granite")
ATTENTION_KEYS = ("flash_attention", "sdp_attention", "xformers_attention", "flex_attention", "sage_attention", "eager_attention", "attn_implementation")
# Models without attention layers: transformers refuses them any attn_implementation.
ATTENTION_FREE_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm")
AXOLOTL_MAMBA_CLASS = "MambaLMHeadModel"  # `model_type:` of Axolotl's own Mamba loader
# Models whose Axolotl examples leave attention unset on purpose.
UNSET_ATTENTION_MODEL_TYPES = ("gemma3n", "gemma3n_text")

# Checks a whole config (plugins registered), as the pipeline's final check does.
Validator = Callable[[dict[str, Any]], list[Any]]


@dataclass(frozen=True)
class _Default:
    key: str
    value: Any
    needs: str | None = None  # the default this one only makes sense with

    def apply(self, config: dict[str, Any]) -> None:
        if self.key == "plugins":
            config["plugins"] = [self.value, *(config.get("plugins") or [])]
        else:
            config[self.key] = self.value

    def describe(self) -> str:
        return f"plugins: + {self.value}" if self.key == "plugins" else f"{self.key}: {self.value}"


def _plugin_names(config: dict[str, Any]) -> set[str | None]:
    return {integration_name(p) for p in config.get("plugins") or []}


def uses_cut_cross_entropy(config: dict[str, Any]) -> bool:
    """The CCE plugin patches the loss unless `cut_cross_entropy: false` (its option defaults to on)."""
    if config.get("cut_cross_entropy"):
        return True
    return "cut_cross_entropy" in _plugin_names(config) and config.get("cut_cross_entropy") is not False


def _attention_default_applies(config: dict[str, Any], speedups: Speedups) -> bool:
    """False where the config or the model decides attention itself."""
    if any(config.get(key) for key in ATTENTION_KEYS):
        return False  # the user's choice, flex attention (which builds its own masks) included
    if config.get("gemma4_hybrid_attn_impl"):
        return False  # Axolotl picks flash attention for it, and refuses any other
    model_type = speedups.model_type or ""
    if model_type in ATTENTION_FREE_MODEL_TYPES or config.get("model_type") == AXOLOTL_MAMBA_CLASS:
        return False
    if not speedups.model_type and "mamba" in str(config.get("base_model", "")).lower():
        return False  # Axolotl's loader treats a config-less "mamba" repo as Mamba
    return model_type not in UNSET_ATTENTION_MODEL_TYPES


def _candidate_defaults(config: dict[str, Any], hardware: Hardware, speedups: Speedups) -> list[_Default]:
    """The defaults for `config`, each guarded by what it must not clash with, in order."""
    work = copy.deepcopy(config)
    chosen: list[_Default] = []

    def default(key: str, value: Any, needs: str | None = None, force: bool = False) -> None:
        if force or work.get(key) is None:
            chosen.append(_Default(key, value, needs))
            chosen[-1].apply(work)

    def ours(key: str) -> str | None:
        return key if any(d.key == key for d in chosen) else None

    if _attention_default_applies(work, speedups):
        default("attn_implementation", "flash_attention_2" if speedups.flash_attn else "sdpa")
    # Axolotl keeps packed samples from attending to each other only with flash attention.
    packs_cleanly = work.get("attn_implementation") == "flash_attention_2" or bool(work.get("flash_attention"))
    if packs_cleanly and not work.get("rl") and not work.get("pretraining_dataset"):
        default("sample_packing", True, needs=ours("attn_implementation"))
        if work.get("sample_packing"):
            default("pad_to_sequence_len", True, needs=ours("sample_packing"))
    if work.get("bf16") in (None, "auto") and work.get("fp16") is None:
        default("bf16", bool(hardware.bf16), force=True)
        if not hardware.bf16:
            default("fp16", True)
    if speedups.liger and speedups.model_type in LIGER_MODEL_TYPES and "liger" not in _plugin_names(work):
        tensor_parallel = (work.get("tensor_parallel_size") or 1) > 1
        own_mlp = work.get("tiled_mlp") and not work.get("tiled_mlp_use_original_mlp")
        # Axolotl 0.21 refuses the DFT and EAFT losses beside Liger's fused cross-entropy
        other_loss = uses_cut_cross_entropy(work) or work.get("chunked_cross_entropy") or work.get("use_dft") or work.get("use_eaft")
        default("plugins", LIGER_PLUGIN, force=True)
        default("liger_rope", True, needs="plugins")
        if not tensor_parallel:  # Liger's RMSNorm and its losses do not support tensor parallelism
            default("liger_rms_norm", True, needs="plugins")
        if not own_mlp:  # tiled MLP replaces the MLP Liger's GLU kernel would patch
            default("liger_glu_activation", True, needs="plugins")
        if not (tensor_parallel or other_loss):  # one fused cross-entropy at a time
            default("liger_fused_linear_cross_entropy", True, needs="plugins")
    if not speedups.fits_without_checkpointing:
        default("gradient_checkpointing", True)
    default("save_total_limit", 2)
    return chosen


def _with(config: dict[str, Any], defaults: list[_Default]) -> dict[str, Any]:
    result = copy.deepcopy(config)
    for d in defaults:
        d.apply(result)
    return result


def _accepted_defaults(config: dict[str, Any], defaults: list[_Default], validate: Validator) -> tuple[list[_Default], list[str]]:
    """Add the defaults one by one, keeping each one Axolotl accepts (no problem the
    config did not have already); a left-out default takes the ones that need it along."""
    already = {str(p) for p in validate(config)}
    kept: list[_Default] = []
    left_out: dict[str, tuple[str, list[str]]] = {}
    for d in defaults:
        if d.needs in left_out:
            left_out[d.needs][1].append(d.describe())
            continue
        new = [str(p) for p in validate(_with(config, [*kept, d])) if str(p) not in already]
        if new:
            left_out[d.key] = (f"fast default {d.describe()} left out: Axolotl refuses it with this config ({new[0]})", [])
        else:
            kept.append(d)
    notes = [note + (f"; so are {', '.join(along)}" if along else "") for note, along in left_out.values()]
    return kept, notes


def apply_fast_defaults(config: dict[str, Any], hardware: Hardware, speedups: Speedups, validate: Validator | None = None) -> FastDefaults:
    """On a GPU, what experienced Axolotl users set for speed, where the job left it unset.

    A default never changes what the config asks for: each applies only where it is
    compatible with the rest of the config, and with `validate` (Axolotl's check of the
    whole config) a default Axolotl would refuse is left out, with a note, instead of
    failing the job. Changes `config` in place.
    """
    if not hardware.has_gpu:
        return FastDefaults()
    defaults = _candidate_defaults(config, hardware, speedups)
    dropped: list[str] = []
    if validate is not None and defaults and validate(_with(config, defaults)):
        defaults, dropped = _accepted_defaults(config, defaults, validate)
    for d in defaults:
        d.apply(config)
    return FastDefaults(chosen=[d.describe() for d in defaults], dropped=dropped)




def with_fast_defaults(plan: AxolotlPlan, hardware: Hardware, speedups: Speedups, validate: Validator | None = None) -> tuple[AxolotlPlan, FastDefaults]:
    config = copy.deepcopy(plan.config)
    fast = apply_fast_defaults(config, hardware, speedups, validate)
    return replace(plan, config=config), fast


