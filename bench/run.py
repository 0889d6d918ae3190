"""Benchmarks that print figures (never asserted): worker overhead, time to first
progress and where it goes, the warm-start saving of the tokenized-data cache, how
soon the CLI answers (a refusal, a preflight next to `axolotl preprocess`), and a cold
worker's start (ready for a job, its first training step, next to `axolotl train`'s), and a
cold worker's answer to a quick question (`mode: runs`, `mode: generate`).

    .venv/bin/python bench/run.py [overhead|startup|warm|answers|coldstart|quick|all] [--runs N] [--epochs E]
                                  [--handler-src DIR]  (coldstart: another tree's src/, for a before/after)

Every figure comes from runs made side by side in this one invocation, on the tiny
model and dataset of test_input.json, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BASE_ENV = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def job(run_id: str, epochs: int) -> dict:
    body = json.loads((REPO / "test_input.json").read_text())["input"]
    body.pop("evaluation", None)  # the training alone, as `axolotl train` does it
    body["run_id"] = run_id
    body["args"]["num_epochs"] = epochs
    return body


def run_worker(volume: Path, run_id: str, epochs: int) -> tuple[float, Path]:
    job_file = volume / f"{run_id}.json"
    job_file.write_text(json.dumps({"input": job(run_id, epochs)}))
    started = time.perf_counter()
    subprocess.run(
        [str(Path(PYTHON).parent / "finetune-worker"), "run", str(job_file), "--json"],
        env={**BASE_ENV, "BASE_VOLUME": str(volume)}, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started, volume / "runs" / "local" / run_id / "config.yaml"


def run_axolotl(config: Path, scratch: Path) -> tuple[float, float]:
    """`axolotl train` on the worker's YAML, with its own output and cache folders:
    (wall seconds, seconds between "Model successfully saved" and the process's exit)."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg["output_dir"] = str(scratch / "output")
    cfg["dataset_prepared_path"] = str(scratch / "prepared")
    raw = scratch / "config.yaml"
    raw.write_text(yaml.safe_dump(cfg))
    env = {**BASE_ENV, "PYTHONPATH": str(REPO / "src"), "FINETUNE_PROGRESS_FILE": str(scratch / "progress.jsonl")}
    started = time.perf_counter()
    saved = None
    with subprocess.Popen([PYTHON, "-m", "axolotl.cli.train", str(raw)], env=env, cwd=scratch,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as child:
        for line in child.stdout:
            if b"Model successfully saved" in line:
                saved = time.perf_counter()
    if child.returncode != 0 or saved is None:
        raise SystemExit(f"axolotl train failed (exit {child.returncode})")
    ended = time.perf_counter()
    return ended - started, ended - saved


def run_warm_worker(volume: Path, run_id: str, epochs: int) -> float:
    """The job through the pipeline of an already started worker (RunPod's case: the
    schema imports were paid when the worker started, before it took any job)."""
    env = {**BASE_ENV, "BASE_VOLUME": str(volume)}
    started = time.perf_counter()
    timeline = asyncio.run(_timed_events(job(run_id, epochs), env))
    if timeline[-1][2]["type"] != "result":
        raise SystemExit(f"the warm worker's job failed: {timeline[-1][2]}")
    return time.perf_counter() - started


def overhead(runs: int, epochs: int) -> dict:
    """The same job through `finetune-worker run`, through a started worker, and through
    `axolotl train`, interleaved."""
    cli, warm, raw, teardown = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(runs):
            volume = Path(tmp) / f"w{index}"
            volume.mkdir()
            seconds, config = run_worker(volume, f"bench-{index}", epochs)
            cli.append(seconds)
            warm.append(run_warm_worker(volume, f"warm-{index}", epochs))
            scratch = Path(tmp) / f"a{index}"
            scratch.mkdir()
            seconds, after_save = run_axolotl(config, scratch)
            raw.append(seconds)
            teardown.append(after_save)
            print(f"  run {index + 1}: finetune-worker run {cli[-1]:.2f}s, started worker {warm[-1]:.2f}s, "
                  f"axolotl train {raw[-1]:.2f}s ({after_save:.2f}s of it after the model was saved)", flush=True)
    c, w, a, t = (statistics.median(x) for x in (cli, warm, raw, teardown))
    return {
        "runs": runs, "epochs": epochs,
        "cli_median_s": round(c, 2), "started_worker_median_s": round(w, 2), "axolotl_median_s": round(a, 2),
        "ratio": round(c / a, 3),
        "ratio_started_worker": round(w / a, 3),
        # The worker's training child skips the interpreter teardown that `axolotl train`
        # pays after saving; these ratios charge the worker as if axolotl skipped it too.
        "axolotl_after_save_median_s": round(t, 2),
        "ratio_without_teardown": round(c / (a - t), 3),
        "ratio_started_worker_without_teardown": round(w / (a - t), 3),
    }


async def _timed_events(body: dict, env: dict) -> list[tuple[float, float, dict]]:
    from finetune_worker.pipeline import run_job

    out = []
    async for event in run_job(body, env=env):
        out.append((time.perf_counter(), time.time(), event))
    return out


def startup(epochs: int) -> dict:
    """Job receipt -> first progress event, with the moments in between.

    The worker imports the schema code once when it starts (before it takes jobs; main()
    measures that apart): it is paid once per worker, not per job. The training child starts at receipt (on standby) and imports Axolotl while the
    worker validates, so the moments below overlap rather than add up.
    """
    with tempfile.TemporaryDirectory() as tmp:
        env = {**BASE_ENV, "BASE_VOLUME": tmp}
        received_perf, received_wall = time.perf_counter(), time.time()
        timeline = asyncio.run(_timed_events(job("startup", epochs), env))
        records = [json.loads(line) for line in (Path(tmp) / "runs/local/startup/progress.jsonl").read_text().splitlines()]
    wall_of = {r.get("stage") or r["kind"]: r["time"] for r in reversed(records)}

    def first(predicate) -> float:
        return next(t - received_perf for t, _, e in timeline if predicate(e))

    return {
        "first_progress_s": round(first(lambda e: e["type"] == "progress"), 2),
        "seconds_after_receipt": {
            "worker: validated (pydantic + Axolotl schema)": round(first(lambda e: e["type"] == "status" and e["stage"] == "preparing"), 2),
            "worker: run dir, data check, YAML done; training released": round(
                first(lambda e: e["type"] == "status" and "run directory" in e.get("message", "")), 2),
            "child (started at receipt): imports done, config loaded, tokenizing": round(wall_of["preprocessing"] - received_wall, 2),
            "child: datasets tokenized, loading the model": round(wall_of["downloading"] - received_wall, 2),
            "child: trainer built, training begins": round(wall_of["train_begin"] - received_wall, 2),
            "first progress event": round(first(lambda e: e["type"] == "progress"), 2),
        },
    }


def warm(epochs: int) -> dict:
    """Two jobs on the same data and volume: the second loads the tokenized dataset."""
    with tempfile.TemporaryDirectory() as tmp:
        volume = Path(tmp)
        figures = {}
        for name in ("cold", "warm"):
            seconds, config = run_worker(volume, f"warm-{name}", epochs)
            records = [json.loads(line) for line in (config.parent / "progress.jsonl").read_text().splitlines()]
            stage = {r.get("stage"): r["time"] for r in records if r["kind"] == "stage"}
            log = (config.parent / "train.log").read_text()
            figures[name] = {
                "job_s": round(seconds, 2),
                "dataset_step_s": round(stage["downloading"] - stage["preprocessing"], 3),
                "loaded_prepared_dataset": "Loading prepared dataset from disk" in log,
            }
        shutil.rmtree(volume / "runs", ignore_errors=True)
    figures["dataset_step_saving"] = round(figures["cold"]["dataset_step_s"] / max(figures["warm"]["dataset_step_s"], 1e-3), 1)
    return figures


def timed_cli(job_body: dict, volume: Path) -> dict:
    """`finetune-worker run JOB --json` from a cold start, as a user runs it: seconds to its
    first event and to its last (the error or the result), and what the last one was."""
    job_file = volume / f"{job_body.get('run_id', 'job')}-{time.monotonic_ns()}.json"
    job_file.write_text(json.dumps({"input": job_body}))
    started = time.perf_counter()
    child = subprocess.Popen([str(Path(PYTHON).parent / "finetune-worker"), "run", str(job_file), "--json"],
                             env={**BASE_ENV, "BASE_VOLUME": str(volume)}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    first = last = None
    event: dict = {}
    for line in child.stdout:
        if line.startswith("{"):
            last = time.perf_counter() - started
            first = first if first is not None else last
            event = json.loads(line)
    child.wait()
    return {"first_event_s": round(first or 0, 2), "answer_s": round(last or 0, 2), "answer": event.get("code") or event.get("mode") or event["type"],
            "problems": len(event.get("details") or [])}


def run_preprocess(config: Path, scratch: Path) -> float:
    """`axolotl preprocess` of the worker's YAML: what a preflight does (tokenize), in Axolotl alone
    (without the worker's plugin, which saves a one-process dataset without a process pool)."""
    import yaml

    from finetune_worker.plan.config import PROGRESS_PLUGIN

    cfg = yaml.safe_load(config.read_text())
    cfg["plugins"] = [p for p in cfg.get("plugins") or [] if p != PROGRESS_PLUGIN] or None
    cfg["dataset_prepared_path"] = str(scratch / "prepared")
    cfg["output_dir"] = str(scratch / "output")
    raw = scratch / "preprocess.yaml"
    raw.write_text(yaml.safe_dump(cfg))
    started = time.perf_counter()
    subprocess.run([PYTHON, "-m", "axolotl.cli.preprocess", str(raw)], env={**BASE_ENV, "PYTHONPATH": str(REPO / "src")}, cwd=scratch,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def answers(runs: int) -> dict:
    """How soon a user hears back from the CLI: a refusal, and a preflight next to `axolotl preprocess`."""
    with tempfile.TemporaryDirectory() as tmp:
        volume = Path(tmp)
        bad_id = {**job("x", 1), "run_id": "../x"}
        three = {**job("x", 1), "run_id": "../x"}
        three["args"] = {**three["args"], "datasets": [{**three["args"]["datasets"][0], "type": "alpacca"}]}
        three["args"].pop("base_model")
        only_axolotl = job("typo", 1)
        only_axolotl["args"] = {**only_axolotl["args"], "datasets": [{**only_axolotl["args"]["datasets"][0], "type": "alpacca"}]}
        figures = {name: [timed_cli(body, volume) for _ in range(runs)] for name, body in (
            ("refusal: run_id ../x", bad_id), ("refusal: run_id, base_model missing, dataset type misspelt", three),
            ("refusal: dataset type misspelt (needs Axolotl's check)", only_axolotl),
        )}
        volumes = [Path(tempfile.mkdtemp(dir=tmp)) for _ in range(runs)]  # each preflight tokenizes: no prepared cache to load
        preflights = [timed_cli({**job(f"preflight-{i}", 1), "mode": "preflight"}, volumes[i]) for i in range(runs)]
        config = volumes[0] / "runs" / "local" / "preflight-0" / "config.yaml"
        preprocess = [run_preprocess(config, Path(tempfile.mkdtemp(dir=tmp))) for _ in range(runs)]
    report = {name: {"median_answer_s": statistics.median(r["answer_s"] for r in rows), "answer": rows[0]["answer"],
                     "problems": rows[0]["problems"], "first_event_s": statistics.median(r["first_event_s"] for r in rows)}
              for name, rows in figures.items()}
    preflight_s = statistics.median(r["answer_s"] for r in preflights)
    preprocess_s = statistics.median(preprocess)
    report["preflight of test_input.json"] = {"median_answer_s": preflight_s, "each_s": [r["answer_s"] for r in preflights],
                                              "axolotl_preprocess_s": round(preprocess_s, 2),
                                              "ratio": round(preflight_s / preprocess_s, 2)}
    return report


def _first_record(path: Path, kind: str, since: float, timeout: float = 300) -> float:
    """Seconds from `since` until a JSON line of this kind (a progress record's `kind`, an
    event's `type`) appears in `path`."""
    while time.perf_counter() - since < timeout:
        if path.is_file():
            for line in path.read_text().splitlines():
                if f'"kind": "{kind}"' in line or f'"type": "{kind}"' in line:
                    return time.perf_counter() - since
                if '"type": "error"' in line:  # the job ended first: say why
                    raise SystemExit(f"no {kind} in {path}: the job ended with {line[:1000]}")
        time.sleep(0.05)
    raise SystemExit(f"no {kind} in {path} after {timeout} s")


def _answers_http(url: str, since: float, timeout: float = 300) -> float:
    while time.perf_counter() - since < timeout:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return time.perf_counter() - since
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer in {timeout} s")


def _stop_tree(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, 9)
    except ProcessLookupError:
        pass
    child.wait()


def cold_worker(volume: Path, handler_src: Path, run_id: str, epochs: int) -> dict:
    """`python -u src/handler.py` as RunPod starts it, serving the SDK's local API: seconds until
    it answers (ready for a job), and, the job sent then, until that job's first training step."""
    from finetune_worker.host.tools import free_port

    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen([PYTHON, "-u", str(handler_src / "handler.py"), "--rp_serve_api", "--rp_api_port", str(port)],
                              env={**BASE_ENV, "BASE_VOLUME": str(volume)}, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ready = _answers_http(f"http://127.0.0.1:{port}/docs", started)
        # the local API runs a job sent to /runsync at once, and answers when it ends
        body = json.dumps({"input": job(run_id, epochs)})
        sender = ("import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), "
                  "headers={'Content-Type': 'application/json'}), timeout=600)")
        subprocess.Popen([PYTHON, "-c", sender, f"http://127.0.0.1:{port}/runsync", body], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
        first_step = _first_record(volume / "runs" / "local" / run_id / "events.jsonl", "progress", started)
    finally:
        _stop_tree(server)
    return {"ready_s": round(ready, 2), "first_step_s": round(first_step, 2)}


def axolotl_first_step(config: Path, scratch: Path) -> float:
    """`axolotl train` of the worker's YAML (own output and cache folders): seconds from its start to its first step."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg["output_dir"], cfg["dataset_prepared_path"] = str(scratch / "output"), str(scratch / "prepared")
    raw = scratch / "config.yaml"
    raw.write_text(yaml.safe_dump(cfg))
    progress = scratch / "progress.jsonl"
    env = {**BASE_ENV, "PYTHONPATH": str(REPO / "src"), "FINETUNE_PROGRESS_FILE": str(progress)}
    started = time.perf_counter()
    child = subprocess.Popen([PYTHON, "-m", "axolotl.cli.train", str(raw)], env=env, cwd=scratch, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return _first_record(progress, "step", started)
    finally:
        _stop_tree(child)


def coldstart(runs: int, epochs: int, handler_src: Path) -> dict:
    """A worker that scaled to zero: from `python -u src/handler.py` to ready, and to the first
    job's first step; beside `axolotl train` of the same YAML to its first step, interleaved."""
    workers, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(runs):
            volume = Path(tmp) / f"v{index}"
            volume.mkdir()
            workers.append(cold_worker(volume, handler_src, f"cold-{index}", epochs))
            scratch = Path(tmp) / f"a{index}"
            scratch.mkdir()
            raw.append(axolotl_first_step(volume / "runs" / "local" / f"cold-{index}" / "config.yaml", scratch))
            print(f"  run {index + 1}: worker ready {workers[-1]['ready_s']}s, first step {workers[-1]['first_step_s']}s; "
                  f"axolotl train first step {raw[-1]:.2f}s", flush=True)
    ready = statistics.median(w["ready_s"] for w in workers)
    first = statistics.median(w["first_step_s"] for w in workers)
    axolotl = statistics.median(raw)
    return {"runs": runs, "handler_src": str(handler_src), "ready_median_s": round(ready, 2), "first_step_median_s": round(first, 2),
            "axolotl_first_step_median_s": round(axolotl, 2), "ratio_first_step": round(first / axolotl, 3)}


def cold_answer(volume: Path, body: dict) -> dict:
    """A new `python -u src/handler.py` (the SDK's local API) sent one job as soon as it is
    ready: seconds from its start to ready, and to the job's answer (/runsync returns it)."""
    from finetune_worker.host.tools import free_port

    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen([PYTHON, "-u", str(REPO / "src" / "handler.py"), "--rp_serve_api", "--rp_api_port", str(port)],
                              env={**BASE_ENV, "BASE_VOLUME": str(volume)}, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ready = _answers_http(f"http://127.0.0.1:{port}/docs", started)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/runsync", data=json.dumps({"input": body}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        answered = time.perf_counter() - started
    finally:
        _stop_tree(server)
    last = (answer.get("output") or [{}])[-1]
    return {"ready_s": round(ready, 2), "answer_s": round(answered, 2), "answer": last.get("code") or last.get("type")}


def quick(runs: int) -> dict:
    """A worker that scaled to zero asked a quick question: `mode: runs`, and `mode: generate`
    on a run that has finished (one epoch of test_input.json's job, trained here first)."""
    with tempfile.TemporaryDirectory() as tmp:
        volume = Path(tmp)
        run_worker(volume, "asked", 1)
        bodies = {"runs": {"user_id": "local", "mode": "runs"},
                  "generate": {"user_id": "local", "run_id": "asked", "mode": "generate", "prompts": ["What colour is a lemon?"],
                               "max_new_tokens": 16, "temperature": 0}}
        seen, raw = {name: [] for name in bodies}, []
        for _ in range(runs):
            for name, body in bodies.items():
                seen[name].append(cold_answer(volume, body))
                print(f"  {name}: {seen[name][-1]}", flush=True)
            raw.append(raw_generate(volume / "runs" / "local" / "asked" / "output"))
            print(f"  transformers + peft alone: {raw[-1]:.2f}s", flush=True)
    report = {f"mode {name}": {"ready_median_s": statistics.median(r["ready_s"] for r in rows),
                               "answer_median_s": statistics.median(r["answer_s"] for r in rows), "answer": rows[0]["answer"]}
              for name, rows in seen.items()}
    report["mode generate"]["transformers_peft_median_s"] = round(statistics.median(raw), 2)
    report["mode generate"]["ratio"] = round(report["mode generate"]["answer_median_s"] / statistics.median(raw), 2)
    return report


RAW_GENERATE = r"""
import sys
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(adapter)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
prompt = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
prompt += "### Instruction:\nWhat colour is a lemon?\n\n### Response:\n"
ids = tokenizer(prompt, return_tensors="pt")
print(tokenizer.decode(model.generate(**ids, max_new_tokens=16, do_sample=False)[0][ids["input_ids"].shape[1]:]))
"""


def raw_generate(adapter: Path) -> float:
    """The same answer from a script of its own: transformers and peft load the base model and
    the adapter and generate 16 tokens (what a user would run without the worker)."""
    started = time.perf_counter()
    subprocess.run([PYTHON, "-c", RAW_GENERATE, str(REPO / "examples" / "tiny-llama"), str(adapter)], env=BASE_ENV, cwd=REPO,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def machine() -> dict:
    import importlib.metadata as md

    return {
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        **{name: md.version(name) for name in ("axolotl", "torch", "transformers", "runpod")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all", choices=["overhead", "startup", "warm", "answers", "coldstart", "quick", "all"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--handler-src", type=Path, default=REPO / "src", help="coldstart: the src/ whose handler.py starts")
    options = parser.parse_args()
    report = {"machine": machine()}
    if options.what not in ("warm", "answers", "coldstart", "quick"):
        from finetune_worker.entry.worker import _warm_imports

        started = time.perf_counter()
        _warm_imports()  # what a RunPod worker does once, before its first job
        report["worker_start_imports_s"] = round(time.perf_counter() - started, 2)
    if options.what in ("overhead", "all"):
        print("worker overhead (finetune-worker run vs axolotl train, same YAML):", flush=True)
        report["overhead"] = overhead(options.runs, options.epochs)
    if options.what in ("startup", "all"):
        report["startup"] = startup(options.epochs)
    if options.what in ("warm", "all"):
        report["warm_start"] = warm(options.epochs)
    if options.what in ("answers", "all"):
        report["answers"] = answers(options.runs)
    if options.what in ("coldstart", "all"):
        print("a cold worker (python -u src/handler.py, the SDK's local API) vs axolotl train, to the first step:", flush=True)
        report["coldstart"] = coldstart(options.runs, options.epochs, options.handler_src.resolve())
    if options.what in ("quick", "all"):
        print("a cold worker asked mode runs and mode generate (python -u src/handler.py, the SDK's local API):", flush=True)
        report["quick"] = quick(options.runs)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
