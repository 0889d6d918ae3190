"""`export:` (GGUF): what is refused before training, where the files go, and why a
conversion fails. The export itself, after a real training, is in test_publish.py
(test_a_gguf_export_and_merged_weights_are_pushed_and_a_failed_export_resumes_without_training)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import collect, make_job, tiny_args
from finetune_worker.checks.args import ArgsContext, check_args
from finetune_worker.checks.export import NO_CONVERTER, NO_QUANTIZE
from finetune_worker.checks.paths import make_roots
from finetune_worker.checks.validation import validate_job
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import REPO_ROOT, WorkerSettings
from finetune_worker.host.hardware import CPU_ONLY
from finetune_worker.host.rundir import run_paths
from finetune_worker.plan.config import Tracking, build_axolotl_config
from finetune_worker.publish.export import failure_reason

CONVERTER = "convert_hf_to_gguf.py"
EXAMPLES = REPO_ROOT / "examples"  # the tiny model and datasets that ship with the worker: nothing to build


@pytest.fixture
def alice(volume):
    return ArgsContext(roots=make_roots(volume, REPO_ROOT / "examples", "alice"), hardware=CPU_ONLY)


def installed_llama_cpp() -> Path:
    """The worker's llama.cpp here: .venv/share/llama.cpp (make install), or FINETUNE_LLAMA_CPP_DIR (the image)."""
    return WorkerSettings.from_env(os.environ).llama_cpp_dir


def arg_problems(args: dict, ctx: ArgsContext) -> list[str]:
    return [str(p) for p in check_args(args, ctx)[1]]


def validation_details(job: dict, settings: WorkerSettings) -> list[str]:
    with pytest.raises(JobError) as refused:
        validate_job(job, settings, CPU_ONLY)
    assert refused.value.code == "invalid_config", refused.value
    return refused.value.details


def test_a_llama_cpp_dir_in_the_config_is_refused_on_a_shared_worker_and_kept_on_a_pod(alice, volume):
    """It names a directory whose convert_hf_to_gguf.py the export runs: code of the user's choosing."""
    args = tiny_args(EXAMPLES, export={"llama_cpp_dir": str(volume / "users" / "alice" / "llama.cpp")})
    assert arg_problems(args, alice) == [
        "args.export.llama_cpp_dir: names a llama.cpp directory whose code would run; not allowed on a shared worker "
        "(remove it: the worker exports with its own llama.cpp)"
    ]
    pod = ArgsContext(roots=alice.roots, hardware=CPU_ONLY, shared=False)
    assert arg_problems(args, pod) == []


@pytest.mark.parametrize("outfile", ["/etc/cron.d/model.gguf", "../model-{ftype}.gguf", "gguf/model.gguf", "..", "~/.bashrc"])
def test_an_outfile_that_is_not_a_plain_file_name_is_refused(alice, outfile):
    found = arg_problems(tiny_args(EXAMPLES, export={"outfile": outfile}), alice)
    assert found == [
        "args.export.outfile: must be a plain file name such as model-{ftype}.gguf: the GGUF files are written to the run's output/gguf folder"
    ]


def test_the_plan_puts_the_gguf_files_in_the_runs_output(volume):
    paths = run_paths(volume / "runs", "alice", "r1")

    def outfile(export: dict) -> str:
        plan = build_axolotl_config(tiny_args(EXAMPLES, export=export), paths, volume / "prepared", CPU_ONLY, Tracking(model_id="tiny", run_id="r1"))
        return plan.config["export"]["outfile"]

    assert outfile({}) == str(paths.output_dir / "gguf" / "tiny-{ftype}.gguf")
    assert outfile({"outtype": "q8_0", "outfile": "mine-{ftype}.gguf"}) == str(paths.output_dir / "gguf" / "mine-{ftype}.gguf")


def test_quantize_without_llama_quantize_is_refused_before_training(volume, tmp_path):
    """The converter writes f16, bf16 and q8_0 itself; other types need the llama-quantize program."""
    if shutil.which("llama-quantize"):
        pytest.skip("llama-quantize is on PATH here, where Axolotl would find it")
    converter_only = tmp_path / "llama.cpp"
    converter_only.mkdir()
    shutil.copy2(installed_llama_cpp() / CONVERTER, converter_only / CONVERTER)
    settings = WorkerSettings(base_volume=volume, llama_cpp_dir=converter_only)
    job = make_job(tiny_args(EXAMPLES, export={"outtype": "f16", "quantize": ["Q4_K_M"]}))
    assert validation_details(job, settings) == [f"args.export.quantize: {NO_QUANTIZE}"]
    assert "set export.outtype" in NO_QUANTIZE and "image" in NO_QUANTIZE  # what to do instead
    validate_job(make_job(tiny_args(EXAMPLES, export={"outtype": "q8_0"})), settings, CPU_ONLY)  # no quantize: fine


def test_export_on_a_worker_without_llama_cpp_is_refused_before_anything_runs(env, volume, tmp_path):
    job = make_job(tiny_args(EXAMPLES, export={"outtype": "q8_0"}))
    evs = collect(job, {**env, "FINETUNE_LLAMA_CPP_DIR": str(tmp_path)})
    error = evs[-1]
    assert error["type"] == "error" and error["code"] == "invalid_config", error
    assert error["details"] == [f"args.export: {NO_CONVERTER}"]
    assert not (volume / "runs" / job["user_id"] / job["run_id"] / "train.log").exists()


def test_an_adapter_that_cannot_be_merged_cannot_be_exported(volume):
    job = make_job(tiny_args(EXAMPLES, adapter="llama-adapter", export={}))
    details = validation_details(job, WorkerSettings(base_volume=volume))
    assert any(line.startswith("args.export: exports a full fine-tune, or a LoRA merged") for line in details), details


def test_the_tiny_byte_level_tokenizer_is_one_llama_cpp_does_not_know_and_the_failure_says_so(tmp_path):
    """The real converter on the tiny model (no training): llama.cpp recognises a byte-level BPE
    tokenizer only by the token ids of known model families, so the export fails, in words."""
    converter = installed_llama_cpp() / CONVERTER
    assert converter.is_file(), "make install puts llama.cpp's converter in .venv/share/llama.cpp"
    done = subprocess.run([sys.executable, str(converter), str(EXAMPLES / "tiny-llama"), "--outfile", str(tmp_path / "x.gguf"), "--outtype", "q8_0"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and not (tmp_path / "x.gguf").exists()
    reason = failure_reason("llama.cpp's convert_hf_to_gguf.py exited with code 1", done.stderr.splitlines()[-20:])
    assert reason.startswith("llama.cpp does not recognise the model's tokenizer"), reason


def test_a_failure_names_the_last_error_line_of_the_log():
    tail = ["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: Splitting the vocabulary is not supported", ""]
    assert failure_reason("llama.cpp's convert_hf_to_gguf.py exited with code 1", tail) == (
        "llama.cpp's convert_hf_to_gguf.py exited with code 1: ValueError: Splitting the vocabulary is not supported"
    )
    assert failure_reason("Need ~2.0GB free in /x to export, but only 1.0GB available.", ["INFO: done"]) == (
        "Need ~2.0GB free in /x to export, but only 1.0GB available."
    )


def test_the_installed_converter_is_the_pinned_one():
    pinned = (REPO_ROOT / "builder" / "requirements-llama-cpp.txt").read_text().splitlines()
    line = next(item for item in pinned if item.startswith("llama-cpp-python=="))
    assert (installed_llama_cpp() / "PINNED").read_text().startswith(line), "run make install"
    assert (installed_llama_cpp() / "conversion" / "__init__.py").is_file()
