"""The benchmark harnesses run end to end (their figures are printed, never asserted), and
the data step's row check holds its memory flat whatever the file's size."""

import json
import subprocess
import sys

import pytest

from finetune_worker.contract.settings import REPO_ROOT


def run_bench(*argv: str) -> dict:
    done = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{\n"):])


@pytest.mark.training
def test_throughput_harness_compares_worker_and_axolotl_defaults_on_the_same_tokens():
    report = run_bench("bench/throughput.py", "--shape", "tiny", "--rows", "32", "--modes", "lora")
    assert report["tokens_per_epoch"] > 32 and report["rows"] == 32
    lora = report["modes"]["lora"]
    for side in ("worker", "axolotl"):
        assert lora[side]["tokens_per_s"] > 0 and 0 < lora[side]["final_loss"] < 20
    assert lora["worker_defaults"] == []  # no GPU here: no fast defaults
    assert lora["speedup"] > 0


@pytest.mark.training
def test_overhead_harness_reports_the_three_ways_of_running_a_job():
    report = run_bench("bench/run.py", "overhead", "--runs", "1", "--epochs", "1")["overhead"]
    assert report["cli_median_s"] > 0 and report["started_worker_median_s"] > 0 and report["axolotl_median_s"] > 0
    assert report["ratio"] == pytest.approx(report["cli_median_s"] / report["axolotl_median_s"], abs=0.002)  # from unrounded medians


def test_data_check_harness_reports_speed_and_memory_per_size():
    report = run_bench("bench/data_check.py", "--rows", "1000", "2500")
    assert [size["rows"] for size in report["data_check"]] == [1000, 2500]
    for size in report["data_check"]:
        assert size["rows_per_s"] > 0 and size["mb_per_s"] > 0 and size["peak_rss_mb"] >= size["rss_before_check_mb"] > 0


def test_the_row_check_memory_does_not_grow_with_the_file():
    """A 50 MB and a 200 MB JSON Lines file, each checked in a child process of its own:
    the peak resident memory stays the same (reading the files whole, it grew by ~4x their size)."""
    small, big = run_bench("bench/data_check.py", "--rows", "100000", "400000")["data_check"]
    assert big["file_mb"] > 3.5 * small["file_mb"] > 150
    assert big["peak_rss_mb"] - small["peak_rss_mb"] < 20, (small, big)
    assert big["peak_rss_mb"] - big["rss_before_check_mb"] < 50, big


def test_the_answers_harness_times_a_cold_cli_refusal(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", REPO_ROOT / "bench" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = bench.timed_cli({**bench.job("x", 1), "run_id": "../x"}, tmp_path)
    assert figures["answer"] == "invalid_input" and figures["problems"] == 1
    assert 0 < figures["first_event_s"] <= figures["answer_s"]


def test_the_quick_harness_times_a_cold_worker_answering_a_runs_query(tmp_path):
    """bench/run.py quick's cold worker (the real handler, the SDK's local API) on an empty volume."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", REPO_ROOT / "bench" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = bench.cold_answer(tmp_path, {"user_id": "local", "mode": "runs"})
    assert figures["answer"] == "result" and 0 < figures["ready_s"] <= figures["answer_s"], figures
