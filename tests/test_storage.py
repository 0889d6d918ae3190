"""Runs kept in S3-compatible storage, against a real S3 server on loopback (tests/fake_s3.py):
checked before training, checkpoints uploaded while training, outputs at the end, a run
missing from the volume resumed (or answered) from the bucket, s3:// datasets, whose
keys write where, and the keys never leaking."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from conftest import collect, collect_until, make_job, tiny_args
from fake_s3 import BUCKET, S3Server, start_s3


@pytest.fixture(scope="module")
def s3():
    server = start_s3()
    yield server
    server.stop()


@pytest.fixture
def s3_env(env, s3: S3Server):
    """The worker may reach the loopback server (the operator allowed that host)."""
    return {**env, "FINETUNE_ALLOWED_PRIVATE_HOSTS": s3.host_port}


def storage(s3: S3Server, prefix: str = "jobs") -> dict:
    return {"uri": f"s3://{BUCKET}/{prefix}", "endpoint_url": s3.url, "region": "us-east-1"}


def storage_job(tiny, s3: S3Server, user: str = "writer", prefix: str = "jobs", **args) -> dict:
    return make_job(tiny_args(tiny, **args), storage=storage(s3, prefix), credentials=s3.credentials(user))


def the_error(events: list[dict]) -> dict:
    assert events[-1]["type"] == "error", events[-1]
    return events[-1]


def started_training(events: list[dict]) -> bool:
    return any(e["type"] == "status" and e.get("stage") == "training" for e in events)


# -- refused before anything runs ---------------------------------------------------------


def test_a_loopback_endpoint_is_refused_unless_the_operator_allows_it(tiny, env, s3):
    error = the_error(collect(storage_job(tiny, s3), env))
    assert error["code"] == "invalid_input"
    assert any(d.startswith("storage.endpoint_url:") and "loopback" in d and "FINETUNE_ALLOWED_PRIVATE_HOSTS" in d for d in error["details"])


def test_storage_needs_the_jobs_own_keys_and_keys_need_storage(tiny, env, s3):
    job = make_job(tiny_args(tiny), storage=storage(s3))
    error = the_error(collect(job, {**env, "FINETUNE_STORAGE_ACCESS_KEY_ID": "operatorkey1", "FINETUNE_STORAGE_SECRET_ACCESS_KEY": "operatorsecret1"}))
    assert {d.split(":")[0] for d in error["details"]} >= {"credentials.s3_access_key_id", "credentials.s3_secret_access_key"}
    error = the_error(collect(make_job(tiny_args(tiny), credentials=s3.credentials()), env))
    assert error["details"][0].startswith("credentials.s3_access_key_id: storage keys are used only with `storage`")


def test_an_s3_dataset_needs_storage_and_with_the_operators_keys_the_users_prefix(tiny, env):
    args = tiny_args(tiny, datasets=[{"path": "s3://somebucket/data/train.jsonl", "type": "alpaca"}])
    error = the_error(collect(make_job(args), env))
    assert error["details"][0].startswith("args.datasets[0].path: an s3:// dataset is read with the job's storage keys")
    operator = {**env, "FINETUNE_STORAGE_URI": f"s3://{BUCKET}/shared", "FINETUNE_STORAGE_ACCESS_KEY_ID": "operatorkey1",
                "FINETUNE_STORAGE_SECRET_ACCESS_KEY": "operatorsecret1"}
    error = the_error(collect(make_job(args), operator))
    assert f"a dataset must be under s3://{BUCKET}/shared/tester/" in error["details"][0]


@pytest.mark.parametrize("case", ["bad key", "read-only key", "missing bucket"])
def test_a_destination_that_does_not_work_is_refused_before_training(tiny, s3_env, s3, case):
    job = storage_job(tiny, s3, user="reader" if case == "read-only key" else "writer")
    if case == "bad key":
        job["credentials"] = {"s3_access_key_id": "AKIANOTAKEY000000000", "s3_secret_access_key": "not-the-secret-0000000000"}
    if case == "missing bucket":
        job["storage"]["uri"] = "s3://no-such-bucket/jobs"
    events = collect(job, s3_env)
    error = the_error(events)
    assert error["code"] == "storage_error"
    expected = {"bad key": "credentials.s3_access_key_id", "read-only key": "s3:PutObject", "missing bucket": "storage.uri"}[case]
    assert expected in error["message"], error["message"]
    assert not started_training(events)
    assert s3.keys_under(f"jobs/tester/{job['run_id']}") == []


# -- one training kept in the bucket, then resumed and answered from it --------------------

# 10 steps of 4 micro-batches each (slow enough that an upload ends before the last checkpoint), a checkpoint every 2, 2 kept
RESUME_ARGS = {"max_steps": 10, "save_steps": 2, "save_total_limit": 2, "num_epochs": 1, "gradient_accumulation_steps": 4,
               "micro_batch_size": 1}


S3_DATASET = {"path": f"s3://{BUCKET}/data/tester/alpaca.jsonl", "type": "alpaca", "ds_type": "json"}


@pytest.fixture(scope="module")
def stored_run(tiny, volume, s3):
    """One job with its own bucket, trained on a dataset in it: 10 steps, a checkpoint every 2, 2 kept."""
    import os

    from conftest import SECRET_ENV

    env = {**{k: v for k, v in os.environ.items() if k not in SECRET_ENV}, "BASE_VOLUME": str(volume), "HF_HUB_OFFLINE": "1",
           "FINETUNE_ALLOWED_PRIVATE_HOSTS": s3.host_port}
    s3.client().put_object(Bucket=BUCKET, Key="data/tester/alpaca.jsonl", Body=(tiny / "tiny_alpaca.jsonl").read_bytes())
    job = storage_job(tiny, s3, datasets=[S3_DATASET], **RESUME_ARGS)
    return job, env, collect(job, env)


@pytest.mark.training
def test_checkpoints_go_to_the_bucket_while_training_and_the_outputs_at_the_end(stored_run, s3, volume):
    job, _, events = stored_run
    result = events[-1]
    assert result["type"] == "result", events[-3:]
    prefix = f"jobs/tester/{job['run_id']}"
    uploads = [e for e in events if e["type"] == "storage" and e["what"] == "checkpoint"]
    assert {8, 10} <= {e["step"] for e in uploads} <= {2, 4, 6, 8, 10}
    assert all(e["bytes"] > 0 and e["uri"] == f"s3://{BUCKET}/{prefix}/output/checkpoint-{e['step']}" for e in uploads)
    # the first upload did not wait for the training's end: it was reported before the last checkpoint was saved
    assert events.index(uploads[0]) < events.index(next(e for e in events if e["type"] == "checkpoint" and e["step"] == 10))
    assert any(e.get("pruned") for e in uploads)  # save_total_limit: 2 in the bucket too
    keys = s3.keys_under(prefix)
    assert {key.split("/")[4] for key in keys if "/checkpoint-" in key} == {"checkpoint-8", "checkpoint-10"}
    for step in (8, 10):
        assert f"{prefix}/output/checkpoint-{step}/trainer_state.json" in keys
    for name in ("output/adapter_model.safetensors", "output/adapter_config.json", "output/README.md", "loss.png", "job.json",
                 "events.jsonl", "result.json", "config.yaml", "train.log"):
        assert f"{prefix}/{name}" in keys, name
    assert not any(key.startswith(f"{prefix}/data/") for key in keys)
    assert result["storage"]["uri"] == f"s3://{BUCKET}/{prefix}"
    assert f"s3://{BUCKET}/{prefix}/output/adapter_model.safetensors" in result["storage"]["objects"]
    assert json.loads(s3.read(f"{prefix}/result.json"))["run_id"] == job["run_id"]
    assert [e for e in events if e["type"] == "storage" and e["what"] == "outputs"][0]["objects"] >= 5
    assert [key for key in s3.keys_under("") if not key.startswith(("jobs/tester/", "data/tester/"))] == []  # nothing elsewhere


@pytest.mark.training
def test_the_keys_appear_nowhere_but_the_storage_childs_environment(stored_run, s3, volume, caplog):
    job, _, events = stored_run
    canaries = [job["credentials"]["s3_access_key_id"], job["credentials"]["s3_secret_access_key"]]
    run_dir = volume / "runs" / "tester" / job["run_id"]
    prefix = f"jobs/tester/{job['run_id']}"
    for canary in canaries:
        assert canary not in json.dumps(events)
        for path in run_dir.rglob("*"):
            assert not path.is_file() or canary.encode() not in path.read_bytes(), path
        for key in s3.keys_under(prefix):
            assert canary.encode() not in s3.read(key), key
        assert canary not in caplog.text
    recorded = json.loads((run_dir / "job.json").read_text())
    assert recorded["storage"]["uri"] == f"s3://{BUCKET}/jobs" and recorded["credentials_given"]["s3_secret_access_key"] is True


@pytest.mark.training
def test_a_run_gone_from_the_volume_resumes_from_the_bucket_then_answers_from_it(stored_run, s3, volume):
    job, env, _ = stored_run
    prefix = f"jobs/tester/{job['run_id']}"
    run_dir = volume / "runs" / "tester" / job["run_id"]
    # a worker lost its disk after checkpoint-8 reached the bucket: no checkpoint-10, no result there
    s3.delete(*[key for key in s3.keys_under(prefix) if "/checkpoint-10/" in key or key.endswith("result.json")])
    shutil.rmtree(run_dir)
    events = collect(job, env)
    assert events[-1]["type"] == "result", events[-3:]
    restored = [e for e in events if e["type"] == "storage" and e["what"] == "restored"]
    assert restored and restored[0]["step"] == 8
    assert [e["resumed_from_step"] for e in events if e.get("resumed_from_step")] == [8]
    steps = [e["step"] for e in events if e["type"] == "checkpoint"]
    assert steps == [10] and events[-1]["metrics"]["total_steps"] == 10
    assert f"{prefix}/result.json" in s3.keys_under(prefix)

    shutil.rmtree(run_dir)  # and once more: the result in the bucket answers, nothing trains
    events = collect(job, env)
    assert events[-1]["type"] == "result" and events[-1]["reused"] is True
    assert not started_training(events)


@pytest.mark.training
def test_another_user_never_reads_or_writes_a_users_prefix(stored_run, s3, tiny):
    """The operator's bucket for every job: mallory's job under tester's run_id finds nothing of
    tester's (it is under another prefix), and writes only under her own."""
    job, env, _ = stored_run
    operator = {**env, "FINETUNE_STORAGE_URI": f"s3://{BUCKET}/jobs", "FINETUNE_STORAGE_ENDPOINT_URL": s3.url,
                "FINETUNE_STORAGE_ACCESS_KEY_ID": s3.keys["writer"][0], "FINETUNE_STORAGE_SECRET_ACCESS_KEY": s3.keys["writer"][1]}
    before = s3.keys_under("jobs/tester/")
    mallory = {**make_job(tiny_args(tiny, **RESUME_ARGS)), "user_id": "mallory", "run_id": job["run_id"]}
    events = collect_until(mallory, operator, lambda e: e.get("message", "").startswith("run directory"))
    assert not any("kept in" in e.get("message", "") or e["type"] == "storage" for e in events), events
    assert any(e.get("storage") == f"s3://{BUCKET}/jobs/mallory/{job['run_id']}" for e in events)
    assert s3.keys_under("jobs/tester/") == before
    assert [key for key in s3.keys_under("") if not key.startswith(("jobs/tester/", "jobs/mallory/", "data/tester/"))] == []


@pytest.mark.training
def test_an_s3_dataset_is_fetched_checked_and_trained_on(stored_run, tiny, s3_env, s3):
    _, _, events = stored_run
    fetched = [e for e in events if e["type"] == "storage" and e["what"] == "dataset"]
    assert fetched and fetched[0]["bytes"] == (tiny / "tiny_alpaca.jsonl").stat().st_size
    checked = [e for e in events if e.get("datasets")]
    assert checked and checked[0]["datasets"]["args.datasets[0]"]["rows"] > 0
    assert events[-1]["type"] == "result"

    s3.client().put_object(Bucket=BUCKET, Key="data/tester/broken.jsonl", Body=b'{"instruction": "x"}\nnot json\n')
    broken = storage_job(tiny, s3, datasets=[{**S3_DATASET, "path": f"s3://{BUCKET}/data/tester/broken.jsonl"}], max_steps=2)
    events = collect(broken, s3_env)
    assert the_error(events)["code"] == "dataset_error" and not started_training(events)
    missing = storage_job(tiny, s3, datasets=[{**S3_DATASET, "path": f"s3://{BUCKET}/data/tester/none.jsonl"}], max_steps=2)
    error = the_error(collect(missing, s3_env))
    assert error["code"] == "dataset_error" and "does not exist" in error["message"]


@pytest.mark.training
def test_an_upload_that_fails_at_the_end_says_where_the_run_is_and_a_resubmission_uploads_it(tiny, s3_env, s3, volume):
    job = storage_job(tiny, s3, user="checkpoints-only", prefix="ends", max_steps=2, save_steps=2)
    events = collect(job, s3_env)
    error = the_error(events)
    run_dir = volume / "runs" / "tester" / job["run_id"]
    assert error["code"] == "storage_error" and f"the run is complete on this worker's volume in {run_dir}" in error["message"]
    assert [e["step"] for e in events if e["type"] == "storage" and e["what"] == "checkpoint"] == [2]
    assert not (run_dir / "result.json").exists() and (run_dir / "trained.json").exists()

    job["credentials"] = s3.credentials("writer")  # a key that may write everything: the same run is uploaded, not trained again
    events = collect(job, s3_env)
    assert events[-1]["type"] == "result" and not any(e["type"] == "checkpoint" for e in events)
    assert f"ends/tester/{job['run_id']}/result.json" in s3.keys_under(f"ends/tester/{job['run_id']}")
    assert (run_dir / "result.json").exists()


def test_the_keys_go_only_into_the_storage_childs_environment(tmp_path):
    from finetune_worker.checks.storage import storage_target
    from finetune_worker.contract.job import JobInput
    from finetune_worker.contract.settings import WorkerSettings
    from finetune_worker.host.rundir import run_paths
    from finetune_worker.plan.children import build_bucket_argv, build_child_env
    from finetune_worker.plan.credentials import storage_secrets
    from finetune_worker.run.storage import open_bucket

    key, secret = "AKIACANARYKEY0000001", "CANARYsecretS3key000000000000000000000001"
    job = JobInput(user_id="tester", model_id="m", run_id="r", args={"base_model": "x"},
                   storage={"uri": "s3://runs/jobs", "endpoint_url": "https://s3.example.com"},
                   credentials={"s3_access_key_id": key, "s3_secret_access_key": secret})
    settings = WorkerSettings.from_env({"BASE_VOLUME": str(tmp_path), "FINETUNE_STORAGE_ACCESS_KEY_ID": "OPERATORKEY000001",
                                        "FINETUNE_STORAGE_SECRET_ACCESS_KEY": "OPERATORsecret0000001", "AWS_SECRET_ACCESS_KEY": "MACHINEsecret0001"})
    paths = run_paths(settings.runs_dir, "tester", "r")
    machine = {"PATH": "/usr/bin", "AWS_SECRET_ACCESS_KEY": "MACHINEsecret0001", "FINETUNE_STORAGE_SECRET_ACCESS_KEY": "OPERATORsecret0000001"}
    child_env = build_child_env(machine, paths=paths, cache_dir=tmp_path, package_root=tmp_path, hf_token=None, wandb_api_key=None)
    target = storage_target(job, settings)
    bucket = open_bucket(target, child_env, storage_secrets(job, target, settings), paths)
    argv = build_bucket_argv("python", "probe", target.uri, target.endpoint_url, target.region, out=tmp_path / "o.json")
    assert key not in " ".join(argv) and secret not in " ".join(argv)
    assert bucket.env["FINETUNE_S3_ACCESS_KEY_ID"] == key and bucket.env["FINETUNE_S3_SECRET_ACCESS_KEY"] == secret
    for value in (key, secret, "OPERATORsecret0000001", "MACHINEsecret0001"):
        assert value not in child_env.values()  # what training and every other child get
    assert "OPERATORsecret0000001" not in bucket.env.values() and "MACHINEsecret0001" not in bucket.env.values()
    assert bucket.env["AWS_EC2_METADATA_DISABLED"] == "true"


def test_an_object_whose_name_leaves_the_download_folder_is_refused(tmp_path):
    from finetune_worker.host.bucket import StorageFailure, local_target

    assert local_target(tmp_path, "runs/p/ck", "runs/p/ck/sub/a.bin") == tmp_path / "sub" / "a.bin"
    for key in ("runs/p/ck/../../other/x", "runs/p/ck/./a", "runs/p/ck//a", "runs/p/ck/a/.."):
        with pytest.raises(StorageFailure):
            local_target(tmp_path, "runs/p/ck", key)


def test_an_s3_dataset_path_with_dot_segments_is_refused(tiny, env):
    operator = {**env, "FINETUNE_STORAGE_URI": f"s3://{BUCKET}/shared", "FINETUNE_STORAGE_ACCESS_KEY_ID": "operatorkey1",
                "FINETUNE_STORAGE_SECRET_ACCESS_KEY": "operatorsecret1"}
    sneaky = f"s3://{BUCKET}/shared/tester/../mallory/data.jsonl"  # under tester's prefix as a string, not as a key
    error = the_error(collect(make_job(tiny_args(tiny, datasets=[{"path": sneaky, "type": "alpaca"}])), operator))
    assert error["details"][0].startswith("args.datasets[0].path: an s3:// path may not have empty, '.' or '..' segments")


def test_storage_is_not_a_field_of_the_reading_modes(env, s3):
    error = the_error(collect({"user_id": "tester", "mode": "runs", "storage": storage(s3)}, env))
    assert any(d.startswith("storage: not used by mode 'runs'") for d in error["details"])


logging.getLogger("werkzeug").setLevel(logging.WARNING)
