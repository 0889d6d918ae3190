"""Run locks, checkpoint completeness and the disk estimate (no training)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import socket
import time

import pytest

from finetune_worker.contract.settings import REPO_ROOT
from finetune_worker.host import lock as runlock
from finetune_worker.host.lock import RunLock, RunLocked
from finetune_worker.host.rundir import (
    inspect_previous,
    is_complete_checkpoint,
    last_complete_checkpoint,
    run_paths,
    set_aside_diverged,
)
from finetune_worker.sizing.resources import ModelFacts, estimate_disk, kept_checkpoints, lora_params, model_facts


def write_lock(path, owner, age=0.0):
    path.write_text(json.dumps(owner))
    then = time.time() - age
    os.utime(path, (then, then))


def test_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / "r.lock"
    first = RunLock(path, "job-1")
    first.acquire()
    with pytest.raises(RunLocked) as caught:
        RunLock(path, "job-2").acquire()
    assert caught.value.owner["job_id"] == "job-1"
    first.release()
    second = RunLock(path, "job-2")
    second.acquire()
    second.release()
    assert not path.exists()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    path = tmp_path / "r.lock"
    dead = multiprocessing.Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    write_lock(path, {"host": socket.gethostname(), "pid": dead.pid, "token": "old"})
    lock = RunLock(path)
    lock.acquire()
    assert lock.took_over["pid"] == dead.pid
    lock.release()


def test_lock_of_another_host_is_respected_until_its_heartbeat_is_stale(tmp_path):
    path = tmp_path / "r.lock"
    write_lock(path, {"host": "other-worker", "pid": 1, "token": "t"}, age=5)
    with pytest.raises(RunLocked):
        RunLock(path).acquire()
    write_lock(path, {"host": "other-worker", "pid": 1, "token": "t"}, age=runlock.STALE_SECONDS + 5)
    lock = RunLock(path)
    lock.acquire()
    assert lock.took_over["host"] == "other-worker"
    lock.release()


def test_half_written_lock_is_judged_by_its_age(tmp_path):
    path = tmp_path / "r.lock"
    path.write_text("{\"host\": ")
    with pytest.raises(RunLocked):
        RunLock(path).acquire()
    then = time.time() - runlock.STALE_SECONDS - 1
    os.utime(path, (then, then))
    RunLock(path).acquire()


def test_heartbeat_keeps_a_held_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_SECONDS", 0.05)
    path = tmp_path / "r.lock"
    lock = RunLock(path)
    lock.acquire()
    then = time.time() - 1000
    os.utime(path, (then, then))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5
    lock.release()


def test_an_empty_or_unreadable_lock_is_stale_after_a_moment(tmp_path):
    path = tmp_path / "r.lock"
    path.write_text("")  # a worker died between creating the lock and writing it
    with pytest.raises(RunLocked):
        RunLock(path).acquire()  # maybe a worker writing it right now
    then = time.time() - runlock.PARTIAL_GRACE_SECONDS - 1
    os.utime(path, (then, then))
    lock = RunLock(path)
    lock.acquire()
    assert lock.took_over == {} and json.loads(path.read_text())["token"] == lock.token
    lock.release()


def test_a_full_volume_leaves_no_lock_behind(full_volume):
    mount, fill = full_volume
    path = mount / "r.lock"
    filler = fill()
    with pytest.raises(OSError) as caught:
        RunLock(path, "job-1").acquire()
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in mount.iterdir()) == ["filler"]  # no lock, no temporary file
    filler.unlink()  # space is freed: the next submission gets the run at once
    lock = RunLock(path, "job-2")
    lock.acquire()
    assert json.loads(path.read_text())["job_id"] == "job-2"
    lock.release()


def _contend(path, results):
    lock = RunLock(path)
    try:
        lock.acquire()
        results.put(os.getpid())
        time.sleep(1.0)
        lock.release()
    except RunLocked:
        results.put(None)


def test_racing_workers_take_a_stale_lock_exactly_once(tmp_path):
    path = tmp_path / "r.lock"
    write_lock(path, {"host": "gone-worker", "pid": 1, "token": "t"}, age=runlock.STALE_SECONDS + 10)
    results = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_contend, args=(path, results)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    winners = [r for r in (results.get(timeout=5) for _ in workers) if r is not None]
    assert len(winners) == 1


def make_checkpoint(output, step, *, state=True, weights=True, global_step=None):
    path = output / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if weights:
        (path / "adapter_model.safetensors").write_bytes(b"w")
    if state:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step if global_step is None else global_step}))
    return path


def test_checkpoint_completeness(tmp_path):
    assert is_complete_checkpoint(make_checkpoint(tmp_path, 10))
    assert not is_complete_checkpoint(make_checkpoint(tmp_path, 20, state=False))
    assert not is_complete_checkpoint(make_checkpoint(tmp_path, 30, weights=False))
    assert not is_complete_checkpoint(make_checkpoint(tmp_path, 40, global_step=39))
    truncated = make_checkpoint(tmp_path, 50)
    (truncated / "trainer_state.json").write_text('{"global_step": 5')
    assert not is_complete_checkpoint(truncated)
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-10"


def test_previous_run_names_the_resume_point_and_the_skipped_checkpoints(tmp_path):
    paths = run_paths(tmp_path, "u", "r")
    make_checkpoint(paths.output_dir, 100)
    make_checkpoint(paths.output_dir, 200)
    make_checkpoint(paths.output_dir, 300, state=False)
    paths.job_file.write_text(json.dumps({"args_sha256": "abc"}))
    previous = inspect_previous(paths)
    assert previous.checkpoint.name == "checkpoint-200"
    assert [p.name for p in previous.skipped_checkpoints] == ["checkpoint-300"]
    assert previous.args_digest == "abc" and previous.result is None and previous.has_work
    assert not inspect_previous(run_paths(tmp_path, "u", "none")).exists


def test_diverged_checkpoints_are_set_aside_not_deleted(tmp_path):
    for step in (10, 20, 30):
        make_checkpoint(tmp_path, step)
    moved = set_aside_diverged(tmp_path, 20)
    assert sorted(p.name for p in moved) == ["checkpoint-20.diverged", "checkpoint-30.diverged"]
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-10"


TINY = ModelFacts(weight_bytes=4_000_000, needs_download=False, config={"torch_dtype": "float32", "hidden_size": 128,
                  "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2})


def test_full_fine_tune_estimate_counts_weights_and_adam_states():
    estimate = estimate_disk({"save_total_limit": 3, "num_epochs": 5}, TINY)
    params = 1_000_000
    assert estimate.checkpoint == 4_000_000 + 8 * params
    assert estimate.kept == 3 and estimate.final == 4_000_000 and estimate.download == 0
    assert estimate.total == int((3 * 12_000_000 + 4_000_000) * 1.1)


def test_lora_estimate_counts_adapter_params():
    cfg = {"adapter": "lora", "lora_r": 16, "lora_target_linear": True, "save_total_limit": 2}
    per_layer = 16 * (256 * 4 + (128 + 384) * 3)
    assert lora_params(cfg, TINY.config, TINY.params) == 2 * per_layer
    estimate = estimate_disk(cfg, TINY)
    assert estimate.final == 2 * per_layer * 4 and estimate.checkpoint == 3 * estimate.final


def test_kept_checkpoints_follow_the_config():
    """Every save, at most save_total_limit of them; unset (or 0) Axolotl passes 4 to the Trainer, and below 0 it keeps all."""
    assert kept_checkpoints({"save_strategy": "no"}) == 0
    assert kept_checkpoints({"max_steps": 100, "save_steps": 30}) == 4
    assert kept_checkpoints({"max_steps": 100, "save_steps": 50}) == 2
    assert kept_checkpoints({"num_epochs": 3, "saves_per_epoch": 2}) == 4
    assert kept_checkpoints({"num_epochs": 3, "saves_per_epoch": 2, "save_total_limit": 10}) == 6
    assert kept_checkpoints({"num_epochs": 50}) == 4
    assert kept_checkpoints({"num_epochs": 2, "save_total_limit": 0}) == 2
    assert kept_checkpoints({"max_steps": 1000, "save_steps": 1, "save_total_limit": -1}) == 1000  # refused at validation
    assert kept_checkpoints({"save_steps": 0.1, "save_total_limit": 20}) == 10  # a fraction of the total steps
    assert kept_checkpoints({"save_steps": 10, "save_total_limit": 3}) == 3  # the total steps depend on the data


def test_unknown_hub_model_has_no_estimate_and_local_models_are_measured(tmp_path):
    unknown = model_facts("someone/not-cached", tmp_path / "hub")
    assert unknown.needs_download and estimate_disk({}, unknown) is None
    local = model_facts(str(REPO_ROOT / "examples" / "tiny-llama"), tmp_path / "hub")
    assert local.weight_bytes > 1_000_000 and local.bytes_per_param == 4 and not local.needs_download
