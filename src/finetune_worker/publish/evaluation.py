"""Evaluation: the fine-tuned model against its base model, on the same examples.

The child process (`python -m finetune_worker.publish.evaluation SPEC --out FILE`) loads the
eval examples, the base model and then the fine-tune (the adapter on top of the
same base weights, or the full model), and for each model measures:

- `loss` and `perplexity` of the reference answers given the prompts;
- generation metrics of its greedy answers against the references: `exact_match`,
  `jaccard` (word sets), `rouge1`/`rouge2`/`rougeL` (F1, Google's rouge_score) and
  `bleu` (sacrebleu, corpus level, 0-1).

The pure parts (metrics, the publish gate) are importable without torch.
"""

from __future__ import annotations

import math
from pathlib import Path

from finetune_worker.contract.job import EVAL_METRICS
from finetune_worker.host.fastexit import exit_without_teardown, spec_child
from finetune_worker.host.rundir import read_config
from finetune_worker.serve.inference import alpaca_prompt, chat_prompt, generate_texts, load_base, load_finetuned, load_tokenizer

LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


# -- pure: metrics and the gate ---------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    exact = jaccard = 0.0
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for key in rouge:
            rouge[key] += scores[key].fmeasure
        exact += _normalise(prediction) == _normalise(reference)
        words_p, words_r = set(_normalise(prediction).split()), set(_normalise(reference).split())
        union = words_p | words_r
        jaccard += len(words_p & words_r) / len(union) if union else 1.0
    count = max(len(references), 1)
    bleu = sacrebleu.corpus_bleu(predictions, [references]).score / 100 if references else 0.0
    out = {"exact_match": exact / count, "jaccard": jaccard / count, **{k: v / count for k, v in rouge.items()}, "bleu": bleu}
    return {key: round(value, 4) for key, value in out.items()}


def compare(base: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    return {key: round(finetuned[key] - base[key], 4) for key in EVAL_METRICS if key in base and key in finetuned}


def gate(evaluation: dict, metric: str, min_improvement: float) -> tuple[bool, str]:
    """Whether the fine-tune beats the base model on `metric` by more than `min_improvement`."""
    base, tuned = evaluation["base"][metric], evaluation["finetuned"][metric]
    gain = (base - tuned) if metric in LOWER_IS_BETTER else (tuned - base)
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    passed = gain > min_improvement
    verdict = "beats" if passed else "does not beat"
    return passed, (
        f"the fine-tuned model's {metric} {tuned} {verdict} the base model's {base} "
        f"({direction} is better; required improvement more than {min_improvement})"
    )


# -- examples ---------------------------------------------------------------------


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise ValueError(f"cannot tell the format of an eval row with fields {sorted(row)}; set evaluation.dataset.format")


def to_example(row: dict, fmt: str, tokenizer) -> dict:
    """(prompt text as the model saw it in training, reference answer)."""
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "alpaca":
        return {"prompt": alpaca_prompt(row["instruction"], row.get("input")), "reference": row["output"]}
    if fmt == "messages":
        messages = row["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("an eval conversation must end with the assistant's answer (the reference)")
        return {"prompt": chat_prompt(tokenizer, messages[:-1]), "reference": messages[-1]["content"]}
    return {"prompt": row["prompt"], "reference": row["completion"]}


def load_rows(dataset: dict, limit: int) -> list[dict]:
    if dataset.get("rows") is not None:
        return list(dataset["rows"])[:limit]
    import datasets

    path = dataset["path"]
    if Path(path).is_absolute():
        suffix = Path(path).suffix.lower().lstrip(".")
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(suffix)
        loaded = datasets.load_dataset(builder, data_files=path, split="train") if builder else datasets.load_dataset(path, split=dataset.get("split") or "train")
    else:
        loaded = datasets.load_dataset(path, dataset.get("name"), split=dataset.get("split") or "train")
    return [loaded[i] for i in range(min(limit, len(loaded)))]


# -- the child: models ------------------------------------------------------------


def measure(model, tokenizer, examples: list[dict], max_new_tokens: int, temperature: float) -> tuple[dict, list[str]]:
    """Loss of the references given the prompts, then the model's own answers (batched)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    eos = tokenizer.eos_token or ""
    for example in examples:
        prompt_ids = tokenizer(example["prompt"], return_tensors="pt").input_ids.to(device)
        full_ids = tokenizer(example["prompt"] + example["reference"] + eos, return_tensors="pt").input_ids.to(device)
        labels = full_ids.clone()
        labels[:, : prompt_ids.shape[1]] = -100
        answer_tokens = int((labels[:, 1:] != -100).sum())
        if answer_tokens:
            with torch.no_grad():
                total_nll += float(model(input_ids=full_ids, labels=labels).loss) * answer_tokens
            total_tokens += answer_tokens
    completions = generate_texts(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens, temperature)
    predictions = [c.text for c in completions]
    loss = total_nll / total_tokens if total_tokens else float("nan")
    metrics = generation_metrics(predictions, [e["reference"] for e in examples])
    metrics.update(loss=round(loss, 4), perplexity=round(math.exp(min(loss, 50.0)), 4))
    return metrics, predictions


def evaluate(spec: dict) -> dict:
    config = read_config(Path(spec["config"]))
    if config is None:
        raise ValueError(f"the run's config {spec['config']} is missing or not a YAML mapping")
    options = spec["evaluation"]
    output_dir = Path(config["output_dir"])
    tokenizer = load_tokenizer(config, output_dir)
    rows = load_rows(options["dataset"], options["num_examples"])
    examples = [to_example(row, options["dataset"].get("format", "auto"), tokenizer) for row in rows]
    generation = (options["max_new_tokens"], options["temperature"])

    model = load_base(config)
    base, base_out = measure(model, tokenizer, examples, *generation)
    model = load_finetuned(config, output_dir, base=model)
    tuned, tuned_out = measure(model, tokenizer, examples, *generation)
    samples = [
        {"prompt": e["prompt"], "reference": e["reference"], "base": b, "finetuned": t}
        for e, b, t in list(zip(examples, base_out, tuned_out, strict=True))[: options["samples"]]
    ]
    return {"examples": len(examples), "base": base, "finetuned": tuned, "delta": compare(base, tuned), "samples": samples}


def main(argv: list[str] | None = None) -> int:
    return spec_child("finetune_worker.publish.evaluation", evaluate, argv)


if __name__ == "__main__":
    exit_without_teardown(main())  # a failure raises past this and exits as usual
