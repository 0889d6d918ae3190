"""The benchmark harnesses run end to end on the tiny model (their figures are printed, never asserted)."""

import json
import subprocess
import sys

import pytest

from finetune_worker.settings import REPO_ROOT

pytestmark = pytest.mark.training


def run_bench(*argv: str) -> dict:
    done = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{\n"):])


def test_throughput_harness_compares_worker_and_axolotl_defaults_on_the_same_tokens():
    report = run_bench("bench/throughput.py", "--shape", "tiny", "--rows", "32", "--modes", "lora")
    assert report["tokens_per_epoch"] > 32 and report["rows"] == 32
    lora = report["modes"]["lora"]
    for side in ("worker", "axolotl"):
        assert lora[side]["tokens_per_s"] > 0 and 0 < lora[side]["final_loss"] < 20
    assert lora["worker_defaults"] == []  # no GPU here: no fast defaults
    assert lora["speedup"] > 0


def test_overhead_harness_reports_the_three_ways_of_running_a_job():
    report = run_bench("bench/run.py", "overhead", "--runs", "1", "--epochs", "1")["overhead"]
    assert report["cli_median_s"] > 0 and report["started_worker_median_s"] > 0 and report["axolotl_median_s"] > 0
    assert report["ratio"] == pytest.approx(report["cli_median_s"] / report["axolotl_median_s"], abs=0.002)  # from unrounded medians
