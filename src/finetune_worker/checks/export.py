"""`export:` (GGUF, Axolotl 0.21): whether this worker can run the export a job asks for,
checked before anything is downloaded or trained.

Axolotl finds llama.cpp's tools as `axolotl export` does (axolotl.utils.gguf): the
converter in the worker's llama.cpp directory (FINETUNE_LLAMA_CPP_DIR), and
`llama-quantize` there or on PATH, needed only for `export.quantize`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_worker.checks import axolotl_schema
from finetune_worker.contract.errors import Problem
from finetune_worker.contract.job import LORA_ADAPTERS

NO_CONVERTER = (
    "GGUF export needs llama.cpp's converter, which this worker does not have; remove export, or run the job on a worker "
    "that has it: the worker's image carries it, and make install puts it in .venv/share/llama.cpp (the operator can point "
    "FINETUNE_LLAMA_CPP_DIR at another llama.cpp directory)"
)
NO_QUANTIZE = (
    "needs llama.cpp's llama-quantize program, which this worker does not have; remove quantize and set export.outtype "
    "(f16, bf16 or q8_0: the converter writes those by itself), or run the job on a worker built from the image, which has llama-quantize"
)


def wants_export(args: dict[str, Any]) -> bool:
    """`export:` is a block (empty means Axolotl's defaults: f16, no quantization)."""
    return isinstance(args.get("export"), dict)


def export_problems(args: dict[str, Any], llama_cpp_dir: Path) -> list[Problem]:
    if not wants_export(args):
        return []
    adapter = args.get("adapter")
    if adapter and adapter not in LORA_ADAPTERS:
        return [Problem("args.export", f"exports a full fine-tune, or a LoRA merged into its base model first; adapter {adapter!r} "
                                       "cannot be merged: use adapter: lora, or remove export")]
    axolotl_schema.import_axolotl()
    from axolotl.utils.gguf import resolve_llama_cpp, resolve_quantize_bin

    try:
        found = resolve_llama_cpp(llama_cpp_dir)
    except ValueError:
        return [Problem("args.export", NO_CONVERTER)]
    if args["export"].get("quantize"):
        try:
            resolve_quantize_bin(found)
        except ValueError:
            return [Problem("args.export.quantize", NO_QUANTIZE)]
    return []
