"""GGUF export of a trained model (`export:`), as a child process: Axolotl 0.21's `axolotl export`.

    python -m finetune_worker.publish.export SPEC --out result.json

SPEC is a JSON object: `config` (the run's config.yaml), `model_dir` (the full model:
the output, or the LoRA merged into its base model) and `llama_cpp_dir` (the
worker's llama.cpp). Axolotl converts the model with llama.cpp's convert_hf_to_gguf.py
to `export.outtype`, then writes one more file per `export.quantize` type with
llama-quantize, all where `export.outfile` says (the worker puts it in output/gguf).
--out gets {"ok": true, "files": [...]} or {"ok": false, "message": ...}.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from finetune_worker.host.fastexit import exit_without_teardown, spec_child

# What the converter says when it cannot convert a model, and what that means for the user.
CONVERTER_FAILURES = {
    "BPE pre-tokenizer was not recognized": "llama.cpp does not recognise the model's tokenizer (its BPE pre-tokenizer is "
                                            "not one of the model families llama.cpp knows)",
    "not supported!": "llama.cpp cannot convert this model architecture",
}
ERROR_LINE = re.compile(r"^\w*(Error|Exception)\b.*")


def export(spec: dict) -> dict:
    from axolotl.cli.export import do_export

    try:
        files = do_export(spec["config"], {"model_dir": spec["model_dir"], "llama_cpp_dir": spec["llama_cpp_dir"]})
    except ValueError as exc:  # Axolotl's checks: the model cannot be converted as it is, or no room on the disk
        return {"ok": False, "message": str(exc)}
    except subprocess.CalledProcessError as exc:  # the converter or llama-quantize: its output is in the log
        tool = next((Path(part).name for part in map(str, exc.cmd) if part.endswith(".py")), Path(str(exc.cmd[0])).name)
        return {"ok": False, "message": f"llama.cpp's {tool} exited with code {exc.returncode}"}
    return {"ok": True, "files": [str(path) for path in files]}


def export_types(export: dict) -> str:
    """`f16`, or `f16, then Q4_K_M and Q5_K_M`: what the export writes."""
    quantize = export.get("quantize") or []
    quantize = quantize.split(",") if isinstance(quantize, str) else quantize
    return str(export.get("outtype") or "f16") + (f", then {' and '.join(map(str, quantize))}" if quantize else "")


def failure_reason(message: str, log_tail: list[str]) -> str:
    """Why the export failed, in the user's terms where the converter's log says."""
    for line in reversed(log_tail):
        for marker, meaning in CONVERTER_FAILURES.items():
            if marker in line:
                return f"{meaning}: {line.strip()}"
        if ERROR_LINE.match(line.strip()):
            return f"{message}: {line.strip()}"
    return message


def main(argv: list[str] | None = None) -> int:
    return spec_child("finetune_worker.publish.export", export, argv)


if __name__ == "__main__":
    exit_without_teardown(main())
