"""Training throughput: the worker's fast defaults against Axolotl's plain defaults.

    .venv/bin/python bench/throughput.py [--shape llama-3.2-1b|tiny] [--modes lora,full] [--rows N]

For each mode (LoRA, full fine-tune) the README's example request is trained twice
on the same model and data, one epoch each, side by side in this one invocation:

- worker:  the request through `finetune-worker run` (on a GPU it adds its fast
           defaults: attention backend, sample packing, bf16, Liger, ...);
- axolotl: `axolotl train` on the YAML the worker wrote, minus those defaults:
           what the same request gets from Axolotl's own defaults.

Nothing is downloaded: the model has the shape of Llama-3.2-1B (or the tiny test
model) with random weights, the data is a synthetic copy task of varied lengths
(learnable, so the losses can be compared), and the tokenizer is the tiny one in
examples/. Tokens per second count the dataset's real tokens (as the worker's
preflight tokenizes them, padding excluded) over the Trainer's train_runtime; MFU
divides the model FLOPs those tokens need by the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
WORKER = str(Path(PYTHON).parent / "finetune-worker")
BASE_ENV = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Llama-3.2-1B's published config; `tiny` is the test model's.
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=32, vocab_size=579, tie_word_embeddings=False,
                 rope_theta=10000.0, max_position_embeddings=2048),
}
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
WORDS = ("apple banana lime plum orange cherry lemon grape kiwi pear peach cat dog cow duck sheep owl frog horse "
         "pig lion mouse bee red yellow green purple brown pink blue Paris Madrid Rome Tokyo Cairo Lima Oslo").split()


def make_model(shape: str, out: Path) -> Path:
    """A Llama of the given shape with random weights, and the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = out / f"random-{shape}"
    if (model_dir / "config.json").exists():
        return model_dir
    tokenizer = AutoTokenizer.from_pretrained(REPO / "examples" / "tiny-llama")
    config = LlamaConfig(
        **SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if shape != "tiny" else torch.float32
    model = LlamaForCausalLM._from_config(config, torch_dtype=dtype)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def make_data(path: Path, rows: int, max_words: int, seed: int = 0) -> None:
    """Alpaca rows of a copy task; lengths spread like real SFT data (many short, a few long)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        count = max(2, min(max_words, int(rng.lognormvariate(0, 0.8) * max_words / 6)))
        words = " ".join(rng.choice(WORDS) for _ in range(count))
        lines.append(json.dumps({"instruction": f"Repeat these words: {words}", "input": "", "output": words}))
    path.write_text("\n".join(lines) + "\n")


def readme_args(model_dir: Path, data: Path, mode: str, sequence_len: int) -> dict:
    """The README's example request, on this model and data, for one epoch."""
    args = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "adapter": "lora",
        "learning_rate": 0.0002,
        # the same for both sides: the length of the run and how often it logs
        "sequence_len": sequence_len, "micro_batch_size": 4, "num_epochs": 1, "logging_steps": 5,
        "val_set_size": 0, "include_tkps": False,
    }
    if mode == "full":
        del args["adapter"]
        args["learning_rate"] = 0.00002
    else:
        args.update(lora_r=16, lora_alpha=32, lora_target_linear=True)
    return args


def worker_job(volume: Path, run_id: str, args: dict, mode: str = "train") -> tuple[list[dict], Path]:
    job_file = volume / f"{run_id}.json"
    job_file.write_text(json.dumps({"input": {"user_id": "bench", "model_id": "throughput", "run_id": run_id, "mode": mode, "args": args}}))
    done = subprocess.run([WORKER, "run", str(job_file), "--json"], env={**BASE_ENV, "BASE_VOLUME": str(volume)},
                          cwd=REPO, capture_output=True, text=True)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not events or events[-1]["type"] != "result":
        raise SystemExit(f"{run_id} failed: {events[-1] if events else done.stderr[-2000:]}")
    return events, volume / "runs" / "bench" / run_id


def plain_axolotl(worker_run: Path, defaults: list[str], scratch: Path) -> Path:
    """`axolotl train` on the worker's YAML with the worker's fast defaults taken out."""
    config = yaml.safe_load((worker_run / "config.yaml").read_text())
    for entry in defaults:
        key = entry.split(":", 1)[0]
        if key == "plugins":
            config["plugins"] = [p for p in config["plugins"] if "liger" not in p]
        else:
            config.pop(key, None)
    config["output_dir"] = str(scratch / "output")
    config["dataset_prepared_path"] = str(scratch / "prepared")
    (scratch / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**BASE_ENV, "PYTHONPATH": str(REPO / "src"), "FINETUNE_PROGRESS_FILE": str(scratch / "progress.jsonl")}
    with open(scratch / "train.log", "wb") as log:
        done = subprocess.run([PYTHON, "-m", "axolotl.cli.train", str(scratch / "config.yaml")], env=env, cwd=scratch, stdout=log, stderr=log)
    if done.returncode != 0:
        raise SystemExit(f"axolotl train failed; see {scratch / 'train.log'}")
    return scratch


def training_figures(run: Path) -> dict:
    """train_runtime and losses from the progress records the worker's plugin wrote."""
    logs = [r["logs"] for r in map(json.loads, (run / "progress.jsonl").read_text().splitlines()) if r["kind"] == "log"]
    summary = next(log for log in reversed(logs) if "train_runtime" in log)
    losses = [log["loss"] for log in logs if isinstance(log.get("loss"), (int, float))]
    tail = losses[-3:] or [float("nan")]
    return {"train_runtime_s": summary["train_runtime"], "train_loss": summary.get("train_loss"), "final_loss": sum(tail) / len(tail),
            "peak_memory_gib": max((log.get("memory/max_allocated (GiB)", 0) for log in logs), default=0)}


def flops_per_token(shape: str, args: dict, mean_len: float) -> float:
    """Model FLOPs per token as the worker's estimate counts them (sizing/throughput.py), so the
    bench's MFU and the estimate's utilisation are one measure: 6N for a full fine-tune, 4N plus
    6x the adapter for LoRA, plus causal attention."""
    from finetune_worker.sizing.resources import lora_params
    from finetune_worker.sizing.throughput import flops_per_token as work_per_token
    from finetune_worker.sizing.throughput import method_of, model_shape

    config = SHAPES[shape]
    method = method_of(args)
    adapter = lora_params(args, config, 0) if method != "full" else 0
    return work_per_token(model_shape(config), method, adapter, mean_len, checkpointing=False).model


def gpu_peak() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "CPU", None
    name = torch.cuda.get_device_name(0)
    peak = next((flops for key, flops in PEAK_BF16.items() if key in name), None)
    return name, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--sequence-len", type=int, default=None, help="default: 2048 (256 for tiny)")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temporary folder)")
    options = parser.parse_args()
    sequence_len = options.sequence_len or (256 if options.shape == "tiny" else 2048)
    work = options.keep or Path(tempfile.mkdtemp(prefix="throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    device, peak = gpu_peak()
    try:
        volume = work / "volume"  # the worker reads models and data only from its volume
        volume.mkdir(exist_ok=True)
        model_dir = make_model(options.shape, volume)
        data = volume / "copy_task.jsonl"
        make_data(data, options.rows, max_words=sequence_len // 4)
        events, _ = worker_job(volume, "preflight", readme_args(model_dir, data, "lora", sequence_len), mode="preflight")
        total = events[-1]["preflight"]["total"]
        tokens, rows = total["tokens"]["total"], total["rows_kept"]
        report = {"shape": options.shape, "device": device, "peak_bf16_flops": peak, "sequence_len": sequence_len,
                  "rows": rows, "tokens_per_epoch": tokens, "modes": {}}
        print(f"{options.shape} on {device}: {rows} rows, {tokens} tokens per epoch (mean {tokens / rows:.0f})", flush=True)
        for mode in options.modes.split(","):
            args = readme_args(model_dir, data, mode, sequence_len)
            events, worker_run = worker_job(volume, f"worker-{mode}", args)
            defaults = next((e["defaults"] for e in events if e.get("defaults")), [])
            scratch = work / f"axolotl-{mode}"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            sides = {"worker": training_figures(worker_run), "axolotl": training_figures(plain_axolotl(worker_run, defaults, scratch))}
            for figures in sides.values():
                figures["tokens_per_s"] = round(tokens / figures["train_runtime_s"], 1)
                if peak:
                    figures["mfu"] = round(figures["tokens_per_s"] * flops_per_token(options.shape, args, tokens / rows) / peak, 4)
            report["modes"][mode] = {
                "worker_defaults": defaults, **sides,
                "speedup": round(sides["worker"]["tokens_per_s"] / sides["axolotl"]["tokens_per_s"], 2),
            }
            print(f"  {mode}: worker {sides['worker']['tokens_per_s']} tok/s (final loss {sides['worker']['final_loss']:.3f}), "
                  f"axolotl defaults {sides['axolotl']['tokens_per_s']} tok/s (final loss {sides['axolotl']['final_loss']:.3f}): "
                  f"{report['modes'][mode]['speedup']}x", flush=True)
        print(json.dumps(report, indent=2))
    finally:
        if options.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
