"""Build the tiny Llama model, tokenizer and datasets that ship in `examples/`.

The embedded default job (`test_input.json`) and the tests train this model on
CPU with no network, so everything here is generated locally and deterministically:
a byte-level BPE tokenizer trained on the dataset text, a randomly initialised
Llama-architecture model of a few hundred thousand parameters, and small alpaca,
chat and completion datasets.

llama.cpp's GGUF converter (`export:`) knows a byte-level BPE tokenizer only when it is
one of a known model family's, so a model to export gets a SentencePiece tokenizer
instead (`--tokenizer sentencepiece`: byte fallback, as Llama 2 and Mistral have).

    python -m finetune_worker.entry.tiny examples/ [--tokenizer sentencepiece]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MODEL_DIR = "tiny-llama"
ALPACA_FILE = "tiny_alpaca.jsonl"
CHAT_FILE = "tiny_chat.jsonl"
COMPLETION_FILE = "tiny_completion.jsonl"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

# Alpaca's own prompt template text, so the tokenizer learns it as a few tokens.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Response:\n"
)

FRUIT_COLOURS = {
    "apple": "red", "banana": "yellow", "lime": "green", "plum": "purple",
    "orange": "orange", "cherry": "red", "lemon": "yellow", "grape": "purple",
    "kiwi": "brown", "pear": "green", "peach": "pink", "blueberry": "blue",
}
ANIMAL_SOUNDS = {
    "cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa",
    "owl": "hoot", "frog": "croak", "horse": "neigh", "pig": "oink", "lion": "roar",
    "mouse": "squeak", "bee": "buzz",
}
CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Chile": "Santiago",
    "Norway": "Oslo", "Cuba": "Havana", "Greece": "Athens", "Poland": "Warsaw",
}


def facts(shuffle_answers: random.Random | None = None) -> list[tuple[str, str]]:
    """(question, answer) pairs a tiny model can memorise.

    With `shuffle_answers`, each question gets a random answer of the right kind:
    the sentences the base model is pre-trained on, so it knows the templates and
    the vocabulary but not the facts the fine-tune teaches.
    """
    rows = []
    for table, question, answer in (
        (FRUIT_COLOURS, "What colour is a {}?", "A {} is {}."),
        (ANIMAL_SOUNDS, "What does a {} say?", "A {} says {}."),
        (CAPITALS, "What is the capital of {}?", "The capital of {} is {}."),
    ):
        values = list(table.values())
        for key, value in table.items():
            if shuffle_answers is not None:
                value = shuffle_answers.choice(values)
            rows.append((question.format(key), answer.format(key, value)))
    return rows


def alpaca_rows() -> list[dict]:
    return [{"instruction": q, "input": "", "output": a} for q, a in facts()]


def chat_rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in facts()
    ]


def completion_rows() -> list[dict]:
    return [{"text": f"Q: {q} A: {a}"} for q, a in facts()]


def render_all_formats(pairs: list[tuple[str, str]]) -> list[str]:
    texts = [ALPACA_PREAMBLE.format(instruction=q) + a for q, a in pairs]
    texts += [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>" for q, a in pairs]
    texts += [f"Q: {q} A: {a}" for q, a in pairs]
    return texts


def pretraining_corpus(seed: int, rounds: int = 8) -> list[str]:
    rng = random.Random(seed)
    return [text for _ in range(rounds) for text in render_all_formats(facts(rng))]


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer (any text encodes) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )


def build_sentencepiece_tokenizer(texts: list[str], vocab_size: int = 512):
    """A SentencePiece BPE tokenizer with byte fallback (any text encodes), as Llama 2 has."""
    import io
    import tempfile

    import sentencepiece
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, user_defined_symbols=SPECIAL_TOKENS[3:], character_coverage=1.0, minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "tokenizer.model").write_bytes(model.getvalue())
        return LlamaTokenizer.from_pretrained(folder, pad_token="<pad>", legacy=False, model_max_length=2048)


TOKENIZERS = {"bpe": build_tokenizer, "sentencepiece": build_sentencepiece_tokenizer}


def build_model(tokenizer, seed: int = 0, hidden_size: int = 128, layers: int = 2):
    """A randomly initialised Llama with a few hundred thousand parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    return LlamaForCausalLM(config)


def pretrain(model, tokenizer, texts: list[str], steps: int, seed: int) -> None:
    """Teach the base model the templates (not the facts) with a plain LM loop."""
    import torch

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = tokenizer(
            [t + tokenizer.eos_token for t in rng.sample(texts, 16)],
            return_tensors="pt",
            padding=True,
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def make_tiny(out_dir: Path, seed: int = 0, pretrain_steps: int = 600, tokenizer_kind: str = "bpe") -> Path:
    """Write the model, tokenizer and datasets under `out_dir`; return the model dir."""
    random.seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = out_dir / MODEL_DIR
    tokenizer = TOKENIZERS[tokenizer_kind](render_all_formats(facts()))
    model = build_model(tokenizer, seed=seed)
    pretrain(model, tokenizer, pretraining_corpus(seed), steps=pretrain_steps, seed=seed)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    write_jsonl(out_dir / ALPACA_FILE, alpaca_rows())
    write_jsonl(out_dir / CHAT_FILE, chat_rows())
    write_jsonl(out_dir / COMPLETION_FILE, completion_rows())
    return model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", choices=sorted(TOKENIZERS), default="bpe")
    args = parser.parse_args()
    model_dir = make_tiny(args.out_dir, seed=args.seed, tokenizer_kind=args.tokenizer)
    print(f"wrote {model_dir}")


if __name__ == "__main__":
    main()
