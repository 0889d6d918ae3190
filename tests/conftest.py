"""Shared fixtures: a tiny model and datasets built by the tests, a volume, job builders."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from finetune_worker.contract.settings import SECRET_ENV_VARS, USER_TOKEN_SETTINGS

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

SECRET_ENV = (*SECRET_ENV_VARS, *USER_TOKEN_SETTINGS.values())


@pytest.fixture(scope="session")
def volume(tmp_path_factory) -> Path:
    """One BASE_VOLUME for the session; tests use unique run ids inside it."""
    return tmp_path_factory.mktemp("volume")


@pytest.fixture(scope="session")
def tiny(volume) -> Path:
    """The tiny Llama, tokenizer and datasets, generated here (no network)."""
    from finetune_worker.entry.tiny import make_tiny

    assets = volume / "assets"
    make_tiny(assets)
    return assets


@pytest.fixture(scope="session")
def tiny_sentencepiece(volume) -> Path:
    """The tiny Llama with a SentencePiece tokenizer, which llama.cpp's GGUF converter reads
    (the byte-level BPE one of `tiny` it does not know). Not pretrained: a GGUF export test
    only converts it."""
    from finetune_worker.entry.tiny import make_tiny

    assets = volume / "assets-sentencepiece"
    make_tiny(assets, pretrain_steps=0, tokenizer_kind="sentencepiece")
    return assets


@pytest.fixture
def full_volume(tmp_path):
    """A real 64 KiB tmpfs, filled up but for `free` bytes; needs root, skipped elsewhere."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")

    def fill(free: int = 0) -> Path:
        filler = mount / "filler"
        with open(filler, "wb") as handle:
            try:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        os.truncate(filler, max(0, filler.stat().st_size - free))
        return filler

    yield mount, fill
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture
def env(volume) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    return {**base, "BASE_VOLUME": str(volume), "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"}


def tiny_args(tiny: Path, **overrides: Any) -> dict[str, Any]:
    """A short LoRA run on the tiny model (about 10 s of training on CPU)."""
    args = {
        "base_model": str(tiny / "tiny-llama"),
        "datasets": [{"path": str(tiny / "tiny_alpaca.jsonl"), "type": "alpaca", "ds_type": "json"}],
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "sequence_len": 256,
        "micro_batch_size": 4,
        "num_epochs": 10,
        "learning_rate": 0.002,
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "logging_steps": 1,
        "val_set_size": 0,
    }
    args.update(overrides)
    return args


def make_job(args: dict[str, Any], **fields: Any) -> dict[str, Any]:
    job = {"user_id": "tester", "model_id": "tiny", "run_id": f"run-{uuid.uuid4().hex[:8]}", "args": args}
    job.update(fields)
    return job


def collect(job_input: Any, env: dict[str, str], hardware=None) -> list[dict]:
    from finetune_worker.host.hardware import CPU_ONLY
    from finetune_worker.pipeline import run_job

    async def run() -> list[dict]:
        return [event async for event in run_job(job_input, env=env, hardware=hardware or CPU_ONLY)]

    return asyncio.run(run())


def collect_until(job_input: Any, env: dict[str, str], stop, hardware=None) -> list[dict]:
    """Drive the job until `stop(event)` holds (or the job ends), then close it: nothing
    after that point runs."""
    from finetune_worker.host.hardware import CPU_ONLY
    from finetune_worker.pipeline import run_job

    async def run() -> list[dict]:
        seen = []
        stream = run_job(job_input, env=env, hardware=hardware or CPU_ONLY)
        try:
            async for event in stream:
                seen.append(event)
                if stop(event) or event["type"] in ("result", "error"):
                    break
        finally:
            await stream.aclose()
        return seen

    return asyncio.run(run())


# A training runs as `python -m axolotl.cli.train CONFIG`, or as the standby child
# `python -m finetune_worker.run.standby CONFIG` that the pipeline starts at job receipt.
TRAINING_PROGRAMS = ("axolotl.cli.train", "finetune_worker.run.standby")


def live_processes(marker: str, programs: tuple[str, ...], parent: int | None = None) -> list[int]:
    """Live (not zombie) processes whose command line names one of `programs` and holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if any(p in cmdline for p in programs) and marker in cmdline and state != "Z" and parent in (None, ppid):
            found.append(int(entry.name))
    return found


def training_pids(marker: str) -> list[int]:
    """Live training processes for the run whose path holds `marker`."""
    return live_processes(marker, TRAINING_PROGRAMS)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: on a machine without it (this project's CI) they are
    skipped, with the reason, in every run (`make test`, `pytest -m gpu`)."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here); run `make gpu-test` on a GPU machine")
    for item in gpu_tests:
        item.add_marker(skip)
