"""What a run shows people: the loss-curve picture and the model card."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
from pathlib import Path
from typing import Any

from finetune_worker.contract.job import LORA_ADAPTERS

CARD_HYPERPARAMETERS = (
    "learning_rate", "num_epochs", "max_steps", "micro_batch_size", "gradient_accumulation_steps", "sequence_len",
    "optimizer", "lr_scheduler", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "adapter",
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear", "load_in_4bit",
    "load_in_8bit", "bf16", "sample_packing", "train_on_inputs", "val_set_size", "seed",
)
VERSION_PACKAGES = ("finetune-worker", "axolotl", "transformers", "peft", "torch", "datasets", "tokenizers", "accelerate")


def loss_points(progress_file: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) and (step, eval_loss) from the progress plugin's records."""
    train, evals = [], []
    if not progress_file.exists():
        return train, evals
    for line in progress_file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        logs = record.get("logs") or {}
        if record.get("kind") == "log" and isinstance(logs.get("loss"), (int, float)):
            train.append((record["step"], logs["loss"]))
        if record.get("kind") == "eval" and isinstance((record.get("metrics") or {}).get("eval_loss"), (int, float)):
            evals.append((record["step"], record["metrics"]["eval_loss"]))
    # a resumed run logs some steps twice: keep the latest value of each step
    return sorted(dict(train).items()), sorted(dict(evals).items())


def write_loss_curve(progress_file: Path, png: Path, title: str) -> bool:
    """Draw loss against step; False when there is nothing to draw."""
    train, evals = loss_points(progress_file)
    if not train:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    axes.plot([s for s, _ in train], [v for _, v in train], label="training loss", linewidth=1.2)
    if evals:
        axes.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="evaluation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)
    return True


def framework_versions() -> dict[str, str]:
    versions = {}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# -- Markdown from the job's strings --------------------------------------------------
# Every value that comes from the job (ids, dataset names, option values, metric names,
# evaluation samples, an earlier run's record) goes into the card through one of these,
# so that it shows as written and cannot close a code span, split a table cell, start
# a new line, or add HTML, a link or an image.

LINE_BREAKS = re.compile(r"\r\n|[\r\n\v\f\x85\u2028\u2029]")
MARKDOWN_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character may be backslash-escaped
HUB_LINKABLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def one_line(value: Any) -> str:
    return LINE_BREAKS.sub(" ", str(value))


def text(value: Any) -> str:
    """Plain text: every punctuation character escaped (no link, image, HTML, entity, code
    span or emphasis can start; `|` cannot split a cell; `www.` cannot autolink)."""
    return MARKDOWN_PUNCTUATION.sub(r"\\\1", one_line(value))


def code(value: Any, cell: bool = False) -> str:
    """An inline code span (shown literally), fenced by more backticks than the value holds.
    In a table `cell`, `|` is written `\\|`: GFM splits cells at a bare `|` even inside a code span."""
    content = one_line(value)
    if cell:
        content = content.replace("|", "\\|")
    if not content.strip():
        return text(content)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", content)), default=0) + 1)
    pad = " " if content[0] in "` " or content[-1] in "` " else ""
    return f"{fence}{pad}{content}{pad}{fence}"


def number(value: Any, sign: str = "") -> str:
    """A metric's value: a number as Python writes it (digits, '.', 'e', '-', 'inf', 'nan'), anything else as text."""
    return format(value, sign) if isinstance(value, (int, float)) else text(value)


def fenced(body: str, info: str = "text") -> list[str]:
    """A fenced code block longer than any run of backticks in `body`, so no line of it closes the block."""
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, body, fence]


def hub_link(repo_id: str, kind: str = "") -> str:
    """A link to a Hub repo, only for a well-formed repo id; anything else is shown as code."""
    if HUB_LINKABLE.match(repo_id):
        return f"[{text(repo_id)}](https://huggingface.co/{kind}{repo_id})"
    return code(repo_id)


def _is_local(value: str) -> bool:
    return value.startswith("/") or value.startswith(".")


def _dataset_names(config: dict) -> tuple[list[str], list[str]]:
    """(Hub dataset ids, local file names); never a local path."""
    hub, local = [], []
    for entry in config.get("datasets") or []:
        path = str(entry.get("path", ""))
        if _is_local(path):
            local.append(Path(path).name)
        elif "://" not in path:
            hub.append(path)
    return hub, local


def _model_name(name: str) -> str:
    return f"a local model ({code(Path(name).name)})" if _is_local(name) else hub_link(name)


def render_model_card(
    *,
    repo_id: str,
    config: dict[str, Any],
    metrics: dict[str, Any],
    versions: dict[str, str],
    has_loss_curve: bool,
    merged: str | None = None,
    lineage: dict | None = None,
    extra_sections: list[str] = (),
    deploy: dict | None = None,
) -> str:
    """README.md for the pushed repo: Hub metadata, how to load it, what mattered."""
    from huggingface_hub import ModelCardData

    base = str((lineage or {}).get("base_model") or config.get("base_model", ""))
    adapter = config.get("adapter") in LORA_ADAPTERS
    hub_datasets, local_datasets = _dataset_names(config)
    data = ModelCardData(
        base_model=None if _is_local(base) else base,
        library_name="peft" if adapter else "transformers",
        tags=["axolotl", "finetune-worker", "generated_from_trainer", str(config.get("adapter") or "full-fine-tune")],
        datasets=hub_datasets or None,
        pipeline_tag="text-generation",
    )
    kind = "A LoRA adapter" if adapter else "A fine-tune"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {text(repo_id.split('/')[-1])}", "",
        f"{kind} of {_model_name(base)}, trained with [Axolotl](https://github.com/axolotl-ai-cloud/axolotl) "
        "by finetune-worker on RunPod.", "",
    ]
    if hub_datasets or local_datasets:
        names = [hub_link(d, "datasets/") for d in hub_datasets] + [f"{code(d)} (local)" for d in local_datasets]
        lines += ["Trained on: " + ", ".join(names) + ".", ""]
    loader = "AutoPeftModelForCausalLM" if adapter else "AutoModelForCausalLM"
    imports = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer"] if adapter else \
        ["from transformers import AutoModelForCausalLM, AutoTokenizer"]
    usage = [*imports, "", f"model = {loader}.from_pretrained({json.dumps(repo_id)})",
             f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(repo_id)})"]
    lines += ["## How to use it", "", *fenced("\n".join(usage), "python"), ""]
    if merged:
        repo, _, folder = merged.partition(":")
        args = f"{json.dumps(repo)}, subfolder={json.dumps(folder)}" if folder else json.dumps(repo)
        lines += ["The adapter merged into the base model, as plain weights:", "",
                  *fenced(f"model = AutoModelForCausalLM.from_pretrained({args})", "python"), ""]
    lines += deploy_section(deploy, local_base=Path(base).name if _is_local(base) else None)
    lines += lineage_section(lineage)
    lines += ["## Training", "", "| hyperparameter | value |", "|---|---|"]
    lines += [f"| {code(key, cell=True)} | {code(config[key], cell=True)} |" for key in CARD_HYPERPARAMETERS if config.get(key) is not None]
    lines += [""]
    if metrics:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {code(key, cell=True)} | {value} |" for key, value in metrics.items() if isinstance(value, (int, float))]
        lines += [""]
    if has_loss_curve:
        lines += ["![Training loss](loss.png)", ""]
    lines += list(extra_sections)
    lines += ["## Framework versions", ""] + [f"- {name} {version}" for name, version in versions.items()] + [""]  # installed packages
    return "\n".join(lines)


def _without_path(value: Any, path: str, placeholder: str) -> Any:
    """`value` (a recipe) with `path` replaced by `placeholder` in every string, shell-quoted forms too."""
    if isinstance(value, dict):
        return {key: _without_path(item, path, placeholder) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_path(item, path, placeholder) for item in value]
    if isinstance(value, str) and path:
        return value.replace(shlex.quote(path), placeholder).replace(path, placeholder)
    return value


def deploy_section(recipe: dict | None, local_base: str | None = None) -> list[str]:
    """How to serve it: RunPod's vLLM worker, `vllm serve`, `transformers serve` (plan/serving.py's recipe).
    A base model that was a local directory appears as <its name>, never as its path."""
    if not recipe:
        return []
    placeholder = f"<{local_base}>"
    if local_base:
        recipe = _without_path(recipe, recipe["runpod_vllm_worker"]["env"].get("MODEL_NAME", ""), placeholder)
    env = recipe["runpod_vllm_worker"]["env"]
    lines = ["## Deploy it", "", f"As a RunPod serverless endpoint with RunPod's vLLM worker ({code(recipe['runpod_vllm_worker']['image'])}), "
             "set these environment variables (add `HF_TOKEN` for a private repo):", ""]
    lines += fenced("\n".join(f"{key}={shlex.quote(one_line(value))}" for key, value in env.items()), "bash")
    lines += ["", "With vLLM on your own GPU (an OpenAI-compatible server on port 8000):", ""]
    lines += [*fenced(one_line(recipe["vllm_serve"]), "bash"), ""]
    if recipe.get("transformers_serve"):
        lines += ["Without vLLM (CPU or any GPU; slower), with transformers' own server:", "",
                  *fenced(one_line(recipe["transformers_serve"]), "bash"), ""]
    elif recipe.get("note"):
        lines += [f"`transformers serve`: {recipe['note']}.", ""]  # the worker's own words (plan/serving.py)
    lines += [f"Then call it as the model {code(recipe['model'])} at `/v1/chat/completions`.", ""]
    if local_base:
        lines += [f"It was trained from a local copy of its base model: replace {code(placeholder)} with that model's Hub id or path.", ""]
    return lines


def gguf_section(repo_id: str, files: list[str]) -> list[str]:
    """The GGUF files of `export:` (paths in the repo), for llama.cpp and the runtimes built on it."""
    if not files:
        return []
    lines = ["## GGUF", "", "Converted with llama.cpp, for llama.cpp, Ollama, LM Studio and other GGUF runtimes:", ""]
    lines += [f"- `{name}`" for name in files]
    return lines + ["", "```bash", f"hf download {repo_id} {files[-1]} --local-dir .", f"llama-cli -m {files[-1]}", "```", ""]


def lineage_section(lineage: dict | None) -> list[str]:
    """How the model was made: the base model, then each run that built on the one before."""
    runs = (lineage or {}).get("runs") or []
    if len(runs) < 2:
        return []
    lines = ["## How it was made", "", f"1. Base model: {_model_name(str(lineage.get('base_model', '')))}"]
    for number, run in enumerate(runs, start=1):
        datasets = ", ".join(code(d) for d in run.get("datasets") or []) or "no dataset recorded"
        start = run.get("continue_from")
        came = ""
        if start:
            point = "its final output" if start.get("checkpoint") == "final" else f"step {text(start.get('checkpoint'))}"
            came = f", from run {code(start.get('run_id'))} ({point})"
        this = " (this model)" if number == len(runs) else ""
        lines.append(f"{number + 1}. Run {code(run.get('run_id'))}{this}: {text(run.get('method'))} on {datasets}{came}")
    return lines + [""]


def cluster_section(cluster: dict | None) -> list[str]:
    """The cluster shape a run trained on (finetune-worker cluster), or nothing on one machine."""
    if not cluster:
        return []
    nodes, per_node = cluster["nodes"], cluster["processes_per_node"]
    return ["## Cluster", "", f"Trained on {nodes} nodes x {per_node} GPU process{'es' if per_node != 1 else ''} "
            f"(world size {cluster['world_size']}), launched with torchrun on every node.", ""]


def time_and_cost_section(measured: dict | None, estimate: dict | None) -> list[str]:
    """What the training measured, beside the estimate for this worker (a GPU type the table knows)."""
    if not measured:
        return []
    rows = [("training time (s)", estimate and estimate.get("train_seconds"), measured.get("train_seconds")),
            ("whole job (s; measured: until this card)", estimate and estimate.get("total_seconds"), measured.get("duration_seconds")),
            ("tokens per second", estimate and estimate.get("tokens_per_second"), measured.get("tokens_per_second")),
            ("utilisation (model FLOPs / peak)", None, measured.get("utilisation")),
            ("peak GPU memory (GiB)", estimate and estimate.get("memory_gib"),
             round(measured["peak_memory_reserved"] / 2**30, 1) if measured.get("peak_memory_reserved") else None),
            ("cost (US$; measured: the job until this card)", estimate and estimate.get("cost_usd"), measured.get("cost_usd"))]
    lines = ["## Time and cost", "", "| | estimated | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'-' if before is None else before} | {'-' if after is None else after} |"
              for name, before, after in rows if before is not None or after is not None]
    for name, phases in (("Phases (s)", measured.get("phases_seconds")), ("Estimated phases (s)", estimate and estimate.get("phases_seconds"))):
        if phases:
            lines += ["", f"{name}: " + ", ".join(f"{phase} {seconds}" for phase, seconds in phases.items())]
    return [*lines, ""]


def evaluation_sections(evaluation: dict) -> list[str]:
    """The base-vs-fine-tuned table and the samples, for the model card."""
    lines = [
        "## Evaluation", "",
        f"The fine-tuned model and its base model on the same {number(evaluation['examples'])} held-out examples "
        "(generation metrics against the reference answers; loss and perplexity of the references).", "",
        "| metric | base model | fine-tuned | change |", "|---|---|---|---|",
    ]
    for key, delta in evaluation["delta"].items():
        lines.append(f"| {text(key)} | {number(evaluation['base'][key])} | {number(evaluation['finetuned'][key])} | {number(delta, '+')} |")
    lines.append("")
    if evaluation.get("samples"):
        lines += ["### Samples", ""]
        for index, sample in enumerate(evaluation["samples"], start=1):
            lines += [f"**Example {index}: prompt**", ""] + fenced(str(sample["prompt"])) + [""]
            for key, title in (("reference", "reference"), ("base", "base model"), ("finetuned", "fine-tuned model")):
                lines += [f"*{title}:*", ""] + fenced(str(sample[key])) + [""]
    return lines
