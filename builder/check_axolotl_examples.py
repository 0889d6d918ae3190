"""How many of Axolotl's own example configs the worker accepts, and why it refuses the rest.

    python builder/check_axolotl_examples.py EXAMPLES_DIR [--gpus 8] [--json]

EXAMPLES_DIR is the `examples/` folder of an Axolotl checkout (any release). Each YAML
that is an Axolotl training config is checked twice on a simulated GPU worker
(H100s, `--gpus` of them): by Axolotl's own validation, as `axolotl train` runs it
(plugins registered, this worker's capabilities), and by the worker's validation of a
job whose `args` is the config. A config that names `trust_remote_code` is then
decided as the pipeline decides it once the base model's config.json is read
(checks/native.py); here the model type comes from the config's `model_type` hints
or the model's name, and is reported as such.

Nothing is downloaded or trained. The summary counts: accepted by both; refused by
Axolotl (the example is stale for the installed release) and what the worker does
with it; refused by the worker only, grouped by rule.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import re
import sys
import tempfile
from pathlib import Path

import yaml

from finetune_worker.checks import axolotl_schema
from finetune_worker.checks.native import native_model_types, remote_code_decision
from finetune_worker.checks.validation import validate_job
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import REPO_ROOT, WorkerSettings
from finetune_worker.host.hardware import Hardware

# The model_type a Hub model's config.json would give, from words in its name.
NAME_HINTS = {
    "mixtral": "mixtral", "mistral": "mistral", "qwen3": "qwen3", "qwen2": "qwen2", "qwen": "qwen2", "phi-3": "phi3", "phi3": "phi3",
    "phi-2": "phi", "falcon": "falcon", "dbrx": "dbrx", "jamba": "jamba", "gemma": "gemma", "deepseek-v3": "deepseek_v3",
    "deepseek-v2": "deepseek_v2", "llama": "llama", "mpt": "mpt", "btlm": "btlm", "xgen": "llama", "stablelm": "stablelm",
    "internlm": "internlm2", "olmo": "olmo", "yi-": "llama", "codellama": "llama", "tinyllama": "llama", "pythia": "gpt_neox",
    "cerebras": "gpt2", "gpt-j": "gptj", "redpajama": "gpt_neox", "openllama": "llama", "starcoder": "starcoder2",
    "lfm2-vl": "lfm2_vl", "lfm2": "lfm2", "glm-4.6v": "glm4v", "glm-4": "glm4", "smolvlm": "smolvlm", "kimi-linear": "kimi_linear",
    "mimo": "mimo", "replit": "replit_lm",
}


def guessed_model_type(config: dict) -> str | None:
    name = str(config.get("base_model", "")).lower()
    hints = sorted(NAME_HINTS.items(), key=lambda item: -len(item[0]))  # the most specific hint first
    return next((kind for hint, kind in hints if hint in name), None)


def is_training_config(config: object) -> bool:
    return isinstance(config, dict) and "base_model" in config and any(k in config for k in ("datasets", "pretraining_dataset"))


def worker_verdict(config: dict, settings: WorkerSettings, hardware: Hardware) -> tuple[str, list[str]]:
    raw = {"user_id": "examples", "model_id": "m", "run_id": "r", "args": copy.deepcopy(config)}
    try:
        valid = validate_job(raw, settings, hardware)
    except JobError as exc:
        return "refused", list(exc.details)
    model_type = guessed_model_type(valid.args)
    _, note, problem = remote_code_decision(valid.args, {"model_type": model_type} if model_type else None, allowed=False)
    if problem:
        return "refused", [f"{problem} (model type guessed from the name: {model_type})"]
    return ("accepted, trust_remote_code dropped" if note else "accepted"), []


def rule_of(detail: str) -> str:
    """A refusal's rule: the option named, less indices."""
    return re.sub(r"\[\d+\]", "[]", detail.split(":", 1)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("examples", type=Path)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)
    hardware = Hardware(gpu_count=options.gpus, gpu_names=("NVIDIA H100 80GB HBM3",) * options.gpus,
                        gpu_memory_bytes=(80 * 1024**3,) * options.gpus, bf16=True, compute_capability=(9, 0), cpu_count=64)
    volume = Path(tempfile.mkdtemp(prefix="examples-volume-"))
    settings = WorkerSettings(base_volume=volume, examples_dir=REPO_ROOT / "examples")
    outcomes: dict[str, dict] = {}
    for path in sorted(options.examples.rglob("*.y*ml")):
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        if not is_training_config(config):
            continue
        plugins = tuple(p for p in config.get("plugins") or [] if isinstance(p, str))
        try:
            axolotl = [str(p) for p in axolotl_schema.schema_problems(copy.deepcopy(config), plugins, hardware, options.gpus)]
        except ValueError as exc:  # a plugin that cannot be registered
            axolotl = [str(exc)]
        verdict, details = worker_verdict(config, settings, hardware)
        outcomes[str(path.relative_to(options.examples))] = {"axolotl": "refused" if axolotl else "accepted", "axolotl_problems": axolotl,
                                                             "worker": verdict, "worker_problems": details}
    summary = collections.Counter((o["axolotl"], o["worker"].split(",")[0]) for o in outcomes.values())
    rules = collections.Counter(rule_of(d) for o in outcomes.values() if o["axolotl"] == "accepted" for d in o["worker_problems"])
    if options.json:
        print(json.dumps({"outcomes": outcomes, "native_model_types": len(native_model_types())}, indent=1))
    else:
        print(f"{len(outcomes)} training configs in {options.examples}")
        for (axolotl, worker), count in sorted(summary.items()):
            print(f"  Axolotl {axolotl:8}  worker {worker:8}  {count}")
        dropped = sum(o["worker"].endswith("dropped") for o in outcomes.values())
        print(f"  trust_remote_code dropped as the model type is native: {dropped}")
        print("refused by the worker only, by the option named:")
        for rule, count in rules.most_common():
            print(f"  {count:3}  {rule}")
        for name, outcome in outcomes.items():
            if outcome["axolotl"] == "accepted" and outcome["worker"] == "refused":
                print(f"  {name}: {outcome['worker_problems'][:2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
