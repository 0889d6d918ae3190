"""Loading a fine-tune and generating with it: shared by the evaluation child and the
generate child, so both see the model exactly as the other does.

Prompts are formatted the way the run was trained: Axolotl's Alpaca template for an
alpaca run, the tokenizer's chat template (which Axolotl saves with the run) for a chat
run, and as given for a completion run. Imports torch only inside functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_worker.contract.job import GENERATION_BATCH, LORA_ADAPTERS
from finetune_worker.host.rundir import END_OF_TURN_TOKENS  # a chat fine-tune of a base model ends answers with one

# -- pure: how a run's prompts look -----------------------------------------------


def prompt_style(config: dict) -> str:
    """alpaca, chat or raw: how the run's first dataset formatted its prompts."""
    datasets = config.get("datasets") or []
    kind = str(datasets[0].get("type", "")) if datasets and isinstance(datasets[0], dict) else ""
    if kind.startswith("alpaca"):
        return "alpaca"
    if kind in ("completion", "") and not config.get("chat_template") and not config.get("rl"):
        return "raw"
    return "chat"


def alpaca_prompt(instruction: str, input_text: str | None = None) -> str:
    from axolotl.prompters import AlpacaPrompter

    return next(iter(AlpacaPrompter().build_prompt(instruction, input_text or None)))


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this run's tokenizer has no chat template: send prompts instead of messages, "
                         "or train with chat_template set")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def format_prompt(style: str, prompt: str, tokenizer) -> str:
    """One user prompt as the run saw prompts in training."""
    if style == "alpaca":
        return alpaca_prompt(prompt)
    if style == "chat" and getattr(tokenizer, "chat_template", None):
        return chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
    return prompt


# -- loading ------------------------------------------------------------------------


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_base(config: dict):
    """The run's base model, on the GPU (quantised as in training) when there is one."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if _cuda():
        kwargs["device_map"] = {"": 0}
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if config.get("load_in_4bit") or config.get("load_in_8bit"):
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=bool(config.get("load_in_4bit")), load_in_8bit=bool(config.get("load_in_8bit")))
    return AutoModelForCausalLM.from_pretrained(config["base_model"], trust_remote_code=bool(config.get("trust_remote_code")), **kwargs)


def load_finetuned(config: dict, model_dir: Path, base=None):
    """The fine-tune: its adapter on the base model (`base`, when already loaded), or its full weights."""
    if config.get("adapter") in LORA_ADAPTERS and (Path(model_dir) / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base if base is not None else load_base(config), str(model_dir))
    from transformers import AutoModelForCausalLM

    del base
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map={"": 0} if _cuda() else None)


def load_tokenizer(config: dict, *candidates: Path):
    """The tokenizer the run saved (with its chat template), else the base model's."""
    from transformers import AutoTokenizer

    for directory in candidates:
        if (Path(directory) / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(directory)
    return AutoTokenizer.from_pretrained(config.get("tokenizer_config") or config["base_model"])


# -- generating ---------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    finish_reason: str  # stop (end of sequence) or length (max_new_tokens reached)


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, batch_size: int = GENERATION_BATCH, on_batch=None) -> list[Completion]:
    """Completions of `prompts` (already formatted), in batches; greedy when temperature is 0.
    `on_batch(first_index, completions)` is called as each batch finishes."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None))
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens follow every prompt directly
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    out: list[Completion] = []
    try:
        for first in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[first:first + batch_size], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=sorted(stops), **sampling)
            done = [_completion(tokenizer, row[batch.input_ids.shape[1]:], max_new_tokens, stops) for row in output]
            out.extend(done)
            if on_batch is not None:
                on_batch(first, done)
    finally:
        tokenizer.padding_side = side
    return out


def stop_token_ids(tokenizer, configured: int | list[int] | None = None) -> set[int]:
    """Where an answer ends: the model's and tokenizer's end of sequence, padding, and the
    end-of-turn tokens the tokenizer has as special tokens."""
    stops = set(configured if isinstance(configured, list) else [configured])
    stops |= {tokenizer.eos_token_id, tokenizer.pad_token_id}
    special = set(getattr(tokenizer, "all_special_tokens", [])) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    stops |= {tokenizer.convert_tokens_to_ids(token) for token in END_OF_TURN_TOKENS if token in special}
    return {token for token in stops if isinstance(token, int) and token >= 0}


def _completion(tokenizer, new_ids, max_new_tokens: int, stops: set[int]) -> Completion:
    ids = new_ids.tolist()
    ended = next((i for i, token in enumerate(ids) if token in stops), None)
    kept = ids if ended is None else ids[:ended]
    reason = "stop" if ended is not None or len(ids) < max_new_tokens else "length"
    return Completion(tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept), reason)
