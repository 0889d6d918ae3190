"""Progress records -> events: throttling, ETA, eval, and the error format."""

import json
from pathlib import Path

from finetune_worker.contract import events
from finetune_worker.contract.errors import JobError
from finetune_worker.run.progress import ProgressTracker


def run_records(steps: int, seconds_per_step: float, tracker=None):
    """Feed a training of `steps` steps; return every event the pipeline would yield."""
    tracker = tracker or ProgressTracker()
    batches = [[{"kind": "train_begin", "step": 0, "max_steps": steps, "time": 100.0}]]
    for step in range(1, steps + 1):
        t = 100.0 + step * seconds_per_step
        batches.append([
            {"kind": "step", "step": step, "max_steps": steps, "epoch": step / steps, "time": t},
            {"kind": "log", "step": step, "logs": {"loss": 2.0 / step, "learning_rate": 1e-3, "epoch": step / steps}, "time": t},
        ])
    out = []
    for batch in batches:  # as the pipeline reads them: a poll's worth at a time
        for record in batch:
            out += tracker.feed(record)
        if progress := tracker.progress_due():
            out.append(progress)
    if progress := tracker.progress_due(force=True):
        out.append(progress)
    return out, tracker


def progress_of(evs):
    return [e for e in evs if e["type"] == "progress"]


def test_progress_is_throttled_to_about_one_per_second_and_ends_with_the_last_step():
    evs, _ = run_records(steps=1000, seconds_per_step=0.01)  # 10 s of training
    progress = progress_of(evs)
    assert 9 <= len(progress) <= 12
    last = progress[-1]
    assert last["step"] == 1000 and last["percent"] == 100.0 and last["eta_seconds"] == 0.0
    assert last["loss"] == 2.0 / 1000


def test_slow_steps_each_get_a_progress_event_with_eta():
    evs, _ = run_records(steps=5, seconds_per_step=2.0)
    progress = progress_of(evs)
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5]
    assert progress[0]["eta_seconds"] == 8.0
    assert progress[0]["total_steps"] == 5 and progress[0]["percent"] == 20.0
    assert set(progress[0]) == {"type", "step", "total_steps", "epoch", "loss", "learning_rate", "percent", "eta_seconds"}


def test_training_status_and_metrics():
    evs, tracker = run_records(steps=4, seconds_per_step=1.0)
    assert evs[0] == {"type": "status", "stage": "training", "message": "training 4 steps", "total_steps": 4}
    assert tracker.metrics["first_loss"] == 2.0 and tracker.metrics["final_loss"] == 0.5


def test_stage_checkpoint_and_eval_records():
    tracker = ProgressTracker()
    assert tracker.feed({"kind": "stage", "stage": "preprocessing", "time": 1})[0]["stage"] == "preprocessing"
    assert tracker.feed({"kind": "stage", "stage": "preprocessing", "time": 2}) == []
    assert tracker.feed({"kind": "checkpoint", "step": 10, "path": "/r/output/checkpoint-10", "time": 3}) == [
        {"type": "checkpoint", "step": 10, "path": "/r/output/checkpoint-10"}
    ]
    evaluation = tracker.feed({"kind": "eval", "step": 10, "metrics": {"eval_loss": 1.25, "eval_runtime": 0.5}, "time": 4})
    assert evaluation == [{"type": "eval", "step": 10, "loss": 1.25, "runtime": 0.5}]
    assert tracker.metrics["eval_loss"] == 1.25


def test_resumed_training_reports_its_start_step_and_eta_counts_from_there():
    tracker = ProgressTracker()
    [begin] = tracker.feed({"kind": "train_begin", "step": 50, "max_steps": 100, "time": 0.0})
    assert begin["message"] == "training 100 steps from step 50"
    tracker.feed({"kind": "step", "step": 60, "time": 10.0})
    assert tracker.progress_due()["eta_seconds"] == 40.0


def test_nan_and_end_records_are_remembered():
    tracker = ProgressTracker()
    tracker.feed({"kind": "nan_loss", "step": 7, "loss": "nan", "time": 1})
    tracker.feed({"kind": "train_end", "step": 7, "time": 2})
    tracker.feed({"kind": "saved", "time": 3})
    assert tracker.nan_step == 7 and tracker.saw_train_end and tracker.saw_saved


def test_error_event_carries_a_json_error_string_for_runpod():
    event = events.error(JobError("invalid_config", "2 problems in the job input", ["a: x", "b: y"]))
    assert event["type"] == "error" and event["code"] == "invalid_config"
    assert json.loads(event["error"]) == {
        "code": "invalid_config",
        "message": "2 problems in the job input",
        "details": ["a: x", "b: y"],
        "log_tail": [],
    }


def test_events_are_json():
    evs, _ = run_records(steps=3, seconds_per_step=1.0)
    for event in evs:
        json.dumps(event, allow_nan=False)


def test_a_ten_hour_run_streams_a_bounded_number_of_progress_events():
    evs, _ = run_records(steps=36_000, seconds_per_step=1.0)
    progress = progress_of(evs)
    assert 2_000 < len(progress) < 3_500  # ~600 + 600 * ln(36000 / 600)
    assert progress[-1]["step"] == 36_000
    assert sum(len(json.dumps(e)) for e in progress) < 1_000_000


def test_train_end_carries_the_peak_gpu_memory_into_the_metrics_only_when_reported():
    gpu = ProgressTracker()
    gpu.feed({"kind": "train_end", "step": 3, "time": 1.0, "peak_memory_reserved": 5 * 2**30})
    assert gpu.metrics["peak_memory_reserved"] == 5 * 2**30
    cpu = ProgressTracker()  # a CPU run's train_end has no figure: the metric is absent, not 0
    cpu.feed({"kind": "train_end", "step": 3, "time": 1.0})
    odd = ProgressTracker()
    odd.feed({"kind": "train_end", "step": 3, "time": 1.0, "peak_memory_reserved": "lots"})
    assert "peak_memory_reserved" not in cpu.metrics and "peak_memory_reserved" not in odd.metrics


def test_the_progress_plugin_reports_the_peak_reserved_gpu_memory_at_train_end(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from finetune_worker.run import progress_plugin

    records = tmp_path / "progress.jsonl"
    monkeypatch.setenv(progress_plugin.PROGRESS_FILE_ENV, str(records))
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    state = SimpleNamespace(global_step=4, max_steps=4)
    callback = progress_plugin.ProgressCallback()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    callback.on_train_end(None, state, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2 * 2**30)
    callback.on_train_end(None, state, None)

    cpu, gpu = [json.loads(line) for line in records.read_text().splitlines()]
    assert cpu["kind"] == gpu["kind"] == "train_end" and "peak_memory_reserved" not in cpu
    assert gpu["peak_memory_reserved"] == 3 * 2**30 and gpu["peak_memory_allocated"] == 2 * 2**30
    tracker = ProgressTracker()
    tracker.feed(gpu)
    assert tracker.metrics["peak_memory_reserved"] == 3 * 2**30 and tracker.metrics["peak_memory_allocated"] == 2 * 2**30


def _gather_peaks(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from finetune_worker.host.hardware import any_rank, peaks_of_every_rank, wait_for_every_rank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    found = peaks_of_every_rank({"peak_memory_reserved": (rank + 1) * 100, "peak_memory_allocated": 90 - rank})
    agreed = [any_rank(rank == 1, "cpu"), any_rank(False, "cpu")]  # one rank saw a stop request; none did
    wait_for_every_rank()
    if rank == 0:
        Path(out).write_text(json.dumps({"peaks": found, "agreed": agreed}))
    dist.destroy_process_group()


def test_every_ranks_peak_memory_is_gathered_and_a_stop_seen_by_one_rank_is_every_ranks(tmp_path):
    """Several processes (gloo on CPU here, NCCL on GPUs): rank 0 reports the largest peak of
    each kind (what must fit on every GPU) and each rank's; one process reports its own. A stop
    request one rank sees is every rank's at the same step (the progress plugin's agreement)."""
    import torch.multiprocessing

    from finetune_worker.host.hardware import any_rank, peaks_of_every_rank
    from finetune_worker.host.tools import free_port

    out = tmp_path / "peaks.json"
    torch.multiprocessing.spawn(_gather_peaks, args=(2, free_port(), str(out)), nprocs=2, join=True)
    found, agreed = json.loads(out.read_text()).values()
    assert agreed == [True, False]
    assert any_rank(True, "cpu") is True and any_rank(False, "cpu") is False  # no process group: its own
    assert found == {"peak_memory_reserved": 200, "peak_memory_allocated": 90, "peak_memory_per_rank": [
        {"rank": 0, "peak_memory_reserved": 100, "peak_memory_allocated": 90},
        {"rank": 1, "peak_memory_reserved": 200, "peak_memory_allocated": 89}]}
    assert peaks_of_every_rank({"peak_memory_reserved": 5}) == {"peak_memory_reserved": 5}  # no process group
    assert peaks_of_every_rank({}) == {}  # a CPU: nothing to gather
    tracker = ProgressTracker()
    tracker.feed({"kind": "train_end", "step": 3, "time": 1.0, **found})
    assert tracker.metrics["peak_memory_reserved"] == 200 and tracker.peak_memory_per_rank == found["peak_memory_per_rank"]
    assert "peak_memory_per_rank" not in tracker.metrics  # the result's metrics stay numbers; measured carries the list


def test_a_step_whose_loss_is_about_to_be_logged_waits_for_it():
    """The worker may read the progress file between a step's record and its log (on several
    ranks the step ends with an all-reduce in between): no progress event without the loss."""
    tracker = ProgressTracker()
    tracker.feed({"kind": "train_begin", "step": 0, "max_steps": 4, "time": 0.0})
    tracker.feed({"kind": "step", "step": 1, "max_steps": 4, "epoch": 0.25, "log_follows": True, "time": 1.0})
    assert tracker.progress_due() is None
    tracker.feed({"kind": "log", "step": 1, "logs": {"loss": 3.5, "learning_rate": 1e-3}, "time": 1.1})
    assert tracker.progress_due()["loss"] == 3.5
    # a step without a log (logging_steps > 1) is reported at once, with the last loss known
    tracker.feed({"kind": "step", "step": 2, "max_steps": 4, "epoch": 0.5, "log_follows": False, "time": 3.0})
    assert tracker.progress_due()["step"] == 2
    tracker.feed({"kind": "step", "step": 3, "max_steps": 4, "epoch": 0.75, "log_follows": True, "time": 5.0})
    assert tracker.progress_due() is None and tracker.progress_due(force=True)["step"] == 3  # the end forces it out


def _phases(*records: dict) -> dict:
    tracker = ProgressTracker()
    for record in records:
        tracker.feed(record)
    return tracker.phases()


def test_the_download_is_a_phase_of_its_own_when_the_model_was_not_cached():
    stages = [{"kind": "stage", "stage": "preprocessing", "time": 10.0}, {"kind": "stage", "stage": "downloading", "time": 12.0}]
    ends = [{"kind": "train_begin", "step": 0, "time": 50.0}, {"kind": "train_end", "step": 9, "time": 80.0}]
    fetched = _phases(*stages, {"kind": "downloaded", "at": 41.5, "time": 44.0}, *ends)
    assert fetched == {"tokenize": 2.0, "download": 29.5, "load": 8.5, "train": 30.0}
    assert _phases(*stages, *ends) == {"tokenize": 2.0, "load": 38.0, "train": 30.0}  # cached or local: loading only


def test_the_download_ends_when_its_last_file_lands_in_the_hub_cache(tmp_path):
    """huggingface_hub renames each file into blobs/ once whole: the newest one since the load began."""
    import os

    from finetune_worker.sizing.resources import download_ended

    blobs = tmp_path / "models--acme--m" / "blobs"
    blobs.mkdir(parents=True)
    for name, when in (("tokenizer", 900.0), ("shard-1", 1010.0), ("shard-2", 1042.5)):
        (blobs / name).write_bytes(b"x")
        os.utime(blobs / name, (when, when))
    assert download_ended("acme/m", tmp_path, since=1000.0) == 1042.5
    assert download_ended("acme/m", tmp_path, since=1100.0) is None  # everything was cached before the load
    assert download_ended("acme/other", tmp_path, since=0.0) is None
