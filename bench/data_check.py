"""Benchmark of the data step's row check on big local JSON Lines files: speed and peak
memory, side by side for 10 K, 100 K and 1 M alpaca rows (figures printed, never asserted).

    .venv/bin/python bench/data_check.py [--rows N ...] [--huge] [--src DIR]

Each file is generated in a temporary folder (about 506 bytes a row, like the Alpaca
set), then checked by `check_datasets` in a child process of its own, which reports
its rows, the seconds (wall and CPU) the check took and its peak resident memory (VmHWM) before and
after the check. `--huge` adds a file of about 2 GB. `--src` points the child at
another source tree (an older checkout, say) to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = (10_000, 100_000, 1_000_000)
HUGE_ROWS = 4_700_000  # about 2 GB
WORDS = (
    "the a of to and in is that for it as with was on be by this are or from at which an have not "
    "model data train answer question explain write list describe give example code function value "
    "number text summary language people time world water energy system simple result because"
).split()


def alpaca_lines(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct alpaca rows as JSON Lines, of Alpaca-like lengths."""
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    lines = []
    for _ in range(count):
        row = {
            "instruction": words(4, 24).capitalize() + "?",
            "input": words(5, 40) if rng.random() < 0.4 else "",
            "output": words(10, 120).capitalize() + ".",
        }
        lines.append(json.dumps(row, ensure_ascii=False).encode() + b"\n")
    return lines


def write_dataset(path: Path, rows: int) -> int:
    """`rows` rows (1,000 distinct ones, repeated) into `path`; its size in bytes."""
    pool = alpaca_lines(1000)
    block = b"".join(pool)
    with open(path, "wb") as out:
        for _ in range(rows // len(pool)):
            out.write(block)
        out.write(b"".join(pool[: rows % len(pool)]))
    return path.stat().st_size


def vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def child(path: str) -> None:
    """In the child: check one file as the worker's data step does, and report."""
    from finetune_worker.data.files import check_datasets

    before = vm_hwm_kib()
    started, cpu = time.perf_counter(), time.process_time()
    checks = check_datasets({"datasets": [{"path": path, "type": "alpaca"}]}, {})
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(json.dumps({"rows": checks[0].rows, "seconds": seconds, "cpu_s": cpu, "hwm_before_kib": before, "hwm_kib": vm_hwm_kib()}))


def measure(path: Path, src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, __file__, "--child", str(path)], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(sizes: list[int], src: Path, folder: Path) -> list[dict]:
    figures = []
    for rows in sizes:
        path = folder / f"alpaca-{rows}.jsonl"
        size = write_dataset(path, rows)
        got = measure(path, src)
        path.unlink()
        assert got["rows"] == rows, got
        mb = size / 1e6
        figures.append({
            "rows": rows, "file_mb": round(mb, 1), "check_s": round(got["seconds"], 2),
            "rows_per_s": round(rows / got["seconds"]), "mb_per_s": round(mb / got["seconds"], 1),
            "cpu_s": round(got["cpu_s"], 2), "mb_per_cpu_s": round(mb / got["cpu_s"], 1),
            "peak_rss_mb": round(got["hwm_kib"] / 1024, 1), "rss_before_check_mb": round(got["hwm_before_kib"] / 1024, 1),
        })
        print(f"  {rows:>9} rows {mb:8.1f} MB: {figures[-1]['check_s']:6.2f} s, {figures[-1]['rows_per_s']:>9} rows/s, "
              f"{figures[-1]['mb_per_s']:6.1f} MB/s ({figures[-1]['mb_per_cpu_s']:6.1f} per CPU second), peak RSS {figures[-1]['peak_rss_mb']:6.1f} MB "
              f"({figures[-1]['rss_before_check_mb']} MB before the check)", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=list(SIZES), help="dataset sizes, in rows")
    parser.add_argument("--huge", action="store_true", help=f"also a file of about 2 GB ({HUGE_ROWS} rows)")
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the source tree the child imports")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options.child)
        return
    sizes = options.rows + ([HUGE_ROWS] if options.huge else [])
    print(f"row check of generated alpaca JSON Lines (source: {options.src}):", flush=True)
    with tempfile.TemporaryDirectory(dir=options.dir) as tmp:
        figures = run(sizes, options.src, Path(tmp))
    print(json.dumps({"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "data_check": figures}, indent=2))


if __name__ == "__main__":
    main()
