"""The generate child: a finished run answers prompts (mode generate).

    python -m finetune_worker.serve.generate SPEC --out FILE

SPEC (JSON): the run's `config` (config.yaml's path), `model_dir` (its adapter or full
weights), `output_dir` (the run's output, where its tokenizer is), `prompts` or `messages`, `max_prompt_tokens`, `max_new_tokens`, `temperature`,
`top_p`, and `records`: a JSON Lines file that gets one line per answer as each batch
finishes (the worker turns them into `generation` events). FILE gets every answer at the
end, or, when a formatted prompt has more than `max_prompt_tokens` tokens, `too_long`
(their indexes and token counts) before any weights load.
Loading and generation are the evaluation child's (serve/inference.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune_worker.host.fastexit import exit_without_teardown, spec_child
from finetune_worker.host.rundir import read_config
from finetune_worker.serve.inference import (
    chat_prompt,
    format_prompt,
    generate_texts,
    load_finetuned,
    load_tokenizer,
    prompt_style,
)


def formatted_prompts(spec: dict, config: dict, tokenizer) -> list[str]:
    if spec.get("messages") is not None:
        return [chat_prompt(tokenizer, conversation) for conversation in spec["messages"]]
    style = prompt_style(config)
    return [format_prompt(style, prompt, tokenizer) for prompt in spec["prompts"]]


def prompts_over(tokenizer, prompts: list[str], limit: int | None) -> list[dict]:
    """The prompts longer than `limit` tokens, as generation tokenizes them."""
    if not limit:
        return []
    counts = [len(tokenizer(prompt).input_ids) for prompt in prompts]
    return [{"index": index, "tokens": count} for index, count in enumerate(counts) if count > limit]


def generate(spec: dict) -> dict:
    config = read_config(Path(spec["config"]))
    if config is None:
        raise ValueError(f"the run's config {spec['config']} is missing or not a YAML mapping")
    model_dir = Path(spec["model_dir"])
    tokenizer = load_tokenizer(config, model_dir, Path(spec.get("output_dir") or model_dir))
    prompts = formatted_prompts(spec, config, tokenizer)
    if too_long := prompts_over(tokenizer, prompts, spec.get("max_prompt_tokens")):
        return {"too_long": too_long}
    model = load_finetuned(config, model_dir)
    records = Path(spec["records"])

    def report(first: int, done: list) -> None:
        with records.open("a", encoding="utf-8") as out:
            for offset, completion in enumerate(done):
                out.write(json.dumps({"index": first + offset, "completion": completion.text, "tokens": completion.tokens,
                                      "finish_reason": completion.finish_reason}) + "\n")

    completions = generate_texts(model, tokenizer, prompts, spec["max_new_tokens"], spec["temperature"], spec["top_p"], on_batch=report)
    return {"style": "chat" if spec.get("messages") is not None else prompt_style(config),
            "completions": [{"completion": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason} for c in completions]}


def main(argv: list[str] | None = None) -> int:
    return spec_child("finetune_worker.serve.generate", generate, argv)


if __name__ == "__main__":
    exit_without_teardown(main())  # a failure raises past this and exits as usual
