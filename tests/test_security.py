"""The confinement, written as the attacks a hostile user of a shared endpoint tried.

Each test is one hole that was open: reading any file through a template path,
running repository code through model kwargs, deleting files through dynamic
checkpointing, reading another user's runs, importing modules through preference
dataset types, escaping the DeepSpeed presets, and secrets kept at rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_args
from finetune_worker.checks import options
from finetune_worker.checks.args import ArgsContext, check_args
from finetune_worker.checks.distributed import PRESET_DIR
from finetune_worker.checks.native import remote_code_decision
from finetune_worker.checks.paths import make_roots
from finetune_worker.checks.validation import validate_job
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import REPO_ROOT, WorkerSettings
from finetune_worker.host.hardware import CPU_ONLY, Hardware

ONE_GPU = Hardware(gpu_count=1, gpu_names=("H100",), gpu_memory_bytes=(80 * 2**30,), bf16=True)


@pytest.fixture
def alice(volume):
    return ArgsContext(roots=make_roots(volume, REPO_ROOT / "examples", "alice"), hardware=CPU_ONLY)


def problems(args, ctx) -> list[str]:
    return [str(p) for p in check_args(args, ctx)[1]]


def only(found: list[str], where: str) -> str:
    mine = [p for p in found if p.startswith(where + ":")]
    assert len(mine) == 1, found
    return mine[0]


# -- the table ----------------------------------------------------------------------


def test_every_axolotl_option_is_classified():
    """Walks Axolotl's schema and every bundled plugin's arguments: a new option that
    can hold a string or a mapping must be given a Kind before the worker accepts it."""
    assert len(options.schema_options()) > 600
    assert options.unclassified() == []
    assert options.stale() == []


def test_an_unclassified_option_is_refused(monkeypatch, tiny, alice):
    monkeypatch.delitem(options.CLASSIFIED, "lora_target_modules")
    assert options.kind_of("lora_target_modules") is options.Kind.UNCLASSIFIED
    found = problems(tiny_args(tiny, lora_target_modules=["q_proj"], lora_target_linear=None), alice)
    assert "not yet classified" in only(found, "args.lora_target_modules")


def test_aliases_share_their_options_kind():
    assert options.kind_of("model_kwargs") is options.Kind.MAPPING  # alias of overrides_of_model_kwargs
    assert options.kind_of("model_config") is options.Kind.MAPPING
    assert options.kind_of("test_datasets.chat_template_jinja") is options.Kind.TEMPLATE
    assert options.kind_of("pretraining_dataset.path") is options.Kind.DATA


# -- 1. reading any file through chat_template_jinja ----------------------------------


@pytest.mark.parametrize("where", ["top", "dataset"])
@pytest.mark.parametrize("target", ["/proc/1/environ", "/proc/self/environ", "/etc/hostname"])
def test_a_template_path_cannot_read_files_outside_the_job(tiny, alice, where, target):
    if where == "top":
        args = tiny_args(tiny, chat_template="jinja", chat_template_jinja=target)
        field = "args.chat_template_jinja"
    else:
        args = tiny_args(tiny, datasets=[{"path": str(tiny / "tiny_alpaca.jsonl"), "type": "alpaca", "chat_template": "jinja", "chat_template_jinja": target}])
        field = "args.datasets[0].chat_template_jinja"
    assert "names a template file that cannot be used" in only(problems(args, alice), field)


def test_inline_templates_and_own_template_files_pass(tiny, alice, volume):
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert not [p for p in problems(tiny_args(tiny, chat_template="jinja", chat_template_jinja=inline), alice) if "chat_template_jinja" in p]
    own = volume / "runs" / "alice" / "templates" / "t.jinja"
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_text(inline)
    checked, found = check_args(tiny_args(tiny, chat_template="jinja", chat_template_jinja=str(own)), alice)
    assert not [p for p in found if "chat_template_jinja" in str(p)]
    assert checked["chat_template_jinja"] == str(own.resolve())


# -- 2. remote code through model kwargs and config overrides -------------------------


@pytest.mark.parametrize(
    "key, value, where",
    [
        ("model_kwargs", {"trust_remote_code": True}, "args.model_kwargs.trust_remote_code"),
        ("overrides_of_model_kwargs", {"trust_remote_code": True}, "args.overrides_of_model_kwargs.trust_remote_code"),
        ("model_config", {"auto_map": {"AutoModelForCausalLM": "evil.Model"}}, "args.model_config.auto_map"),
        ("overrides_of_model_config", {"nested": {"auto_map": {}}}, "args.overrides_of_model_config.nested.auto_map"),
        ("processor_kwargs", {"trust_remote_code": True}, "args.processor_kwargs.trust_remote_code"),
        ("model_kwargs", {"cache_dir": "/etc"}, "args.model_kwargs.cache_dir"),
        ("model_kwargs", {"token": "hf_xxxxxxxxxxxx"}, "args.model_kwargs.token"),
    ],
)
def test_remote_code_and_paths_inside_mappings_are_refused(tiny, alice, key, value, where):
    only(problems(tiny_args(tiny, **{key: value}), alice), where)


def test_remote_code_is_refused_with_what_the_user_can_do(tiny, alice):
    """Inside a mapping, refused at once; the model's own flag is decided by its config.json
    (a model type transformers lacks is refused before any download: test_axolotl_upgrade.py)."""
    message = only(problems(tiny_args(tiny, model_kwargs={"trust_remote_code": True}), alice), "args.model_kwargs.trust_remote_code")
    assert "runs code from a model or kernel repository" in message
    _, _, refused = remote_code_decision({"base_model": "acme/custom", "trust_remote_code": True}, {"model_type": "acme_custom"}, False)
    assert "does not implement" in refused.message and "FINETUNE_ALLOW_TRUST_REMOTE_CODE" in refused.message


# -- 3. deleting files through dynamic checkpointing -----------------------------------


@pytest.mark.parametrize("trigger", ["/etc/passwd", "../../../other/adapter_model.safetensors", "sub/dir"])
def test_the_checkpoint_trigger_file_stays_in_the_run(tiny, alice, trigger):
    args = tiny_args(tiny, dynamic_checkpoint={"enabled": True, "trigger_file_path": trigger})
    assert "plain file name" in only(problems(args, alice), "args.dynamic_checkpoint.trigger_file_path")


def test_a_plain_trigger_file_name_passes(tiny, alice):
    args = tiny_args(tiny, dynamic_checkpoint={"enabled": True, "trigger_file_path": "save-now"})
    assert not [p for p in problems(args, alice) if "dynamic_checkpoint" in p]


# -- 4. one user's runs are invisible to another ---------------------------------------


@pytest.fixture
def bobs_run(volume) -> Path:
    run = volume / "runs" / "bob" / "secret-run"
    (run / "output").mkdir(parents=True, exist_ok=True)
    (run / "output" / "adapter_config.json").write_text("{}")
    (run / "data.jsonl").write_text('{"instruction": "bob", "output": "private"}\n')
    (volume / "runs" / "bob" / "secret-run.lock").write_text("{}")
    (volume / "cache" / "prepared" / "abc").mkdir(parents=True, exist_ok=True)
    return run


def _path_cases(run: Path, volume: Path):
    relative = str(run.relative_to(volume))
    return {
        "datasets": lambda p: {"datasets": [{"path": p + "/data.jsonl", "type": "alpaca"}]},
        "data_files": lambda p: {"datasets": [{"path": "json", "data_files": [p + "/data.jsonl"], "type": "alpaca"}]},
        "lora_model_dir": lambda p: {"lora_model_dir": p + "/output"},
        "resume_from_checkpoint": lambda p: {"resume_from_checkpoint": p + "/output"},
        "base_model": lambda p: {"base_model": p + "/output"},
        "tokenizer_config": lambda p: {"tokenizer_config": p + "/output"},
        "test_datasets": lambda p: {"val_set_size": 0, "test_datasets": [{"path": p + "/data.jsonl", "type": "alpaca", "split": "train"}]},
        "pretraining_dataset": lambda p: {"datasets": None, "max_steps": 2,
                                          "pretraining_dataset": [{"path": p + "/data.jsonl", "type": "pretrain", "text_column": "output"}]},
    }, relative


@pytest.mark.parametrize("option", ["datasets", "data_files", "lora_model_dir", "resume_from_checkpoint", "base_model", "tokenizer_config",
                                    "test_datasets", "pretraining_dataset"])
@pytest.mark.parametrize("absolute", [True, False])
def test_another_users_run_answers_like_a_missing_path(tiny, alice, volume, bobs_run, option, absolute):
    cases, relative = _path_cases(bobs_run, volume)
    target = str(bobs_run) if absolute else relative
    missing = str(bobs_run.with_name("no-such-run")) if absolute else str(Path(relative).with_name("no-such-run"))
    found = problems(tiny_args(tiny, **cases[option](target)), alice)
    absent = problems(tiny_args(tiny, **cases[option](missing)), alice)
    assert found, f"{option} reached another user's run"
    assert [p.replace("secret-run", "X") for p in found] == [p.replace("no-such-run", "X") for p in absent]


def test_the_volume_root_the_caches_and_locks_are_not_readable(tiny, alice, volume, bobs_run):
    for value in (".", str(volume), "cache/prepared/abc", str(volume / "runs" / "bob" / "secret-run.lock")):
        found = problems(tiny_args(tiny, datasets=[{"path": value, "type": "alpaca"}]), alice)
        assert found and found[0].startswith("args.datasets[0].path:"), value
    checked, _ = check_args(tiny_args(tiny, datasets=[{"path": "runs", "type": "alpaca"}]), alice)
    assert checked["datasets"][0]["path"] == "runs", "a name the job may not read locally is only ever a Hub id"


def test_a_user_reads_their_own_runs(tiny, volume):
    own = volume / "runs" / "carol" / "earlier" / "data.jsonl"
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_text('{"instruction": "a", "output": "b"}\n')
    carol = ArgsContext(roots=make_roots(volume, REPO_ROOT / "examples", "carol"), hardware=CPU_ONLY)
    checked, found = check_args(tiny_args(tiny, datasets=[{"path": "runs/carol/earlier/data.jsonl", "type": "alpaca"}]), carol)
    assert found == [] and checked["datasets"][0]["path"] == str(own.resolve())


def test_evaluation_data_of_another_user_is_not_readable(tiny, volume, bobs_run):
    settings = WorkerSettings(base_volume=volume)
    raw = {"user_id": "alice", "model_id": "m", "run_id": "r1", "args": tiny_args(tiny),
           "evaluation": {"dataset": {"path": str(bobs_run / "data.jsonl")}}}
    with pytest.raises(JobError) as caught:
        validate_job(raw, settings, CPU_ONLY)
    assert "evaluation.dataset.path: no such file or directory" in str(caught.value.details)


@pytest.mark.parametrize("run_id", ["x.lock", "x.previous-20260101-000000"])
def test_run_ids_cannot_take_the_workers_own_names(tiny, volume, run_id):
    raw = {"user_id": "alice", "model_id": "m", "run_id": run_id, "args": tiny_args(tiny)}
    with pytest.raises(JobError) as caught:
        validate_job(raw, WorkerSettings(base_volume=volume), CPU_ONLY)
    assert any(d.startswith("run_id:") for d in caught.value.details)


# -- 6. module import through preference dataset types --------------------------------


@pytest.mark.parametrize("kind", ["this.x", "os.system", "antigravity", "chatml.intel.x", "subprocess.run"])
def test_preference_dataset_types_only_name_axolotl_transforms(tiny, alice, kind):
    args = tiny_args(tiny, rl="dpo", datasets=[{"path": str(tiny / "tiny_alpaca.jsonl"), "type": kind}])
    assert "unknown type" in only(problems(args, alice), "args.datasets[0].type")


@pytest.mark.parametrize("rl, kind", [("dpo", "chatml.intel"), ("dpo", "chat_template.default"), ("ipo", "llama3.argilla_chat"), ("kto", "llama3.ultra"), ("orpo", "chat_template.argilla")])
def test_axolotls_own_preference_types_pass(tiny, alice, rl, kind):
    args = tiny_args(tiny, rl=rl, datasets=[{"path": str(tiny / "tiny_alpaca.jsonl"), "type": kind}])
    assert not [p for p in problems(args, alice) if p.startswith("args.datasets[0].type")]


# -- 7. DeepSpeed presets --------------------------------------------------------------


def test_a_path_through_the_presets_directory_cannot_escape(tiny, volume):
    gpu = ArgsContext(roots=make_roots(volume, REPO_ROOT / "examples", "alice"), hardware=ONE_GPU)
    escape = f"{PRESET_DIR}/deepspeed/../../../../../../etc/passwd.json"
    assert only(problems(tiny_args(tiny, deepspeed=escape), gpu), "args.deepspeed")


def test_an_inline_deepspeed_object_cannot_name_disk_paths(tiny, volume):
    gpu = ArgsContext(roots=make_roots(volume, REPO_ROOT / "examples", "alice"), hardware=ONE_GPU)
    config = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/etc"}}}
    only(problems(tiny_args(tiny, deepspeed=config), gpu), "args.deepspeed.zero_optimization.offload_param.nvme_path")


# -- 8. secrets at rest ----------------------------------------------------------------


@pytest.mark.parametrize("key, plugins", [("comet_api_key", []), ("swanlab_api_key", ["axolotl.integrations.swanlab.SwanLabPlugin"])])
def test_tracker_keys_in_args_point_to_credentials(tiny, alice, key, plugins):
    args = tiny_args(tiny, plugins=plugins, **{key: "k" * 20})
    assert f"send it as credentials.{key}" in only(problems(args, alice), f"args.{key}")


def test_the_job_record_keeps_urls_without_their_query(tiny, volume):

    for scheme in ("https", "HTTPS", "Https"):
        signed = f"{scheme}://data.example.com/train.jsonl?X-Amz-Signature=SECRETSIGNATURE&X-Amz-Credential=AKIA"
        raw = {"user_id": "alice", "model_id": "m", "run_id": "r2", "args": tiny_args(tiny, datasets=[{"path": signed, "type": "alpaca"}]),
               "credentials": {"comet_api_key": "CANARYcometKey000001"}}
        record = json.dumps(validate_job(raw, WorkerSettings(base_volume=volume), CPU_ONLY).record())
        assert "SECRETSIGNATURE" not in record and "AKIA" not in record and "CANARYcometKey" not in record, scheme
        assert "://data.example.com/train.jsonl" in record


def test_tracker_keys_reach_only_the_childs_environment(tiny, volume):
    from finetune_worker.contract.job import JobInput
    from finetune_worker.plan.credentials import tracker_secrets as _tracker_secrets

    job = JobInput.model_validate({"user_id": "a", "model_id": "m", "run_id": "r", "args": {}, "credentials": {"comet_api_key": "c" * 12}})
    assert _tracker_secrets(job) == {"COMET_API_KEY": "c" * 12}


def test_a_pods_owner_may_use_what_a_shared_endpoint_refuses(tiny, volume):
    from finetune_worker.entry.pod import pod_roots

    pod = ArgsContext(roots=pod_roots(volume), hardware=CPU_ONLY, allow_trust_remote_code=True, shared=False)
    args = tiny_args(tiny, mlflow_tracking_uri="http://127.0.0.1:5000", model_kwargs={"trust_remote_code": True, "cache_dir": "/tmp"})
    assert problems(args, pod) == []
    assert problems(tiny_args(tiny, comet_api_key="k" * 20), pod), "a credential in the config is stored with the run, Pod or not"


def test_a_deepspeed_path_with_a_nul_byte_is_a_named_problem(tiny, volume):
    """Found by the fuzz test: resolving it raised ValueError out of validation."""
    gpu = ArgsContext(roots=make_roots(volume, REPO_ROOT / "examples", "alice"), hardware=ONE_GPU)
    assert "NUL" in only(problems(tiny_args(tiny, deepspeed="a\x00b.json"), gpu), "args.deepspeed")


# -- 9. remote code through Hub kernels ----------------------------------------------------
# With use_kernels, Axolotl passes allow_all_kernels=True to from_pretrained
# (axolotl/loaders/model.py), and transformers then loads an attn_implementation that
# names a Hub repo through kernels.get_kernel(trust_remote_code=True): any repo's code runs.


@pytest.fixture
def gpu_alice(volume):
    return ArgsContext(roots=make_roots(volume, REPO_ROOT / "examples", "alice"), hardware=ONE_GPU)


@pytest.mark.parametrize("impl", ["evil-user/evil-kernel", "evil-user/evil-kernel@main", "paged|evil-user/evil-kernel",
                                  "evil-user/evil-kernel:flash_attn_varlen_func", "kernels-community/flash-attn3@0123abcd"])
@pytest.mark.parametrize("use_kernels", [True, None])
def test_an_attention_kernel_from_any_hub_repo_is_remote_code(tiny, gpu_alice, impl, use_kernels):
    message = only(problems(tiny_args(tiny, attn_implementation=impl, use_kernels=use_kernels), gpu_alice), "args.attn_implementation")
    assert "FINETUNE_ALLOW_TRUST_REMOTE_CODE" in message


@pytest.mark.parametrize(
    "key, value, where",
    [
        ("model_kwargs", {"allow_all_kernels": True}, "args.model_kwargs.allow_all_kernels"),
        ("model_kwargs", {"kernel_config": {"kernel_mapping": {}}}, "args.model_kwargs.kernel_config"),
        ("model_kwargs", {"attn_implementation": "evil-user/evil-kernel"}, "args.model_kwargs.attn_implementation"),
        ("model_config", {"_attn_implementation": {"text_config": "evil-user/evil-kernel"}}, "args.model_config._attn_implementation"),
    ],
)
def test_hub_kernels_inside_mappings_are_remote_code(tiny, gpu_alice, key, value, where):
    only(problems(tiny_args(tiny, use_kernels=True, **{key: value}), gpu_alice), where)


@pytest.mark.parametrize("impl", [None, "sdpa", "flash_attention_2", "kernels-community/flash-attn3", "kernels-community/flash-attn2"])
def test_kernels_from_the_trusted_community_repos_pass(tiny, gpu_alice, impl):
    """use_kernels alone swaps layers for the kernels transformers names itself
    (kernels-community); an attention kernel of that organisation at its default
    version is what transformers' own flash-attention fallback loads."""
    found = problems(tiny_args(tiny, attn_implementation=impl, use_kernels=True), gpu_alice)
    assert not [p for p in found if "remote" in p or "code" in p], found


def test_the_operator_may_allow_hub_kernels(tiny, volume):
    ctx = ArgsContext(roots=make_roots(volume, REPO_ROOT / "examples", "alice"), hardware=ONE_GPU, allow_trust_remote_code=True)
    found = problems(tiny_args(tiny, attn_implementation="someone/kernel", use_kernels=True, model_kwargs={"allow_all_kernels": True}), ctx)
    assert not [p for p in found if "attn_implementation" in p or "allow_all_kernels" in p], found


# -- 10. a refused DeepSpeed path is never read ----------------------------------------------


def test_another_users_deepspeed_file_answers_like_a_missing_one(tiny, volume, gpu_alice):
    """The ZeRO stage of bob's file must not show through the 8-bit check."""
    bobs = volume / "runs" / "bob" / "r" / "ds.json"
    bobs.parent.mkdir(parents=True, exist_ok=True)
    bobs.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    found = problems(tiny_args(tiny, load_in_8bit=True, deepspeed=str(bobs)), gpu_alice)
    absent = problems(tiny_args(tiny, load_in_8bit=True, deepspeed=str(bobs.with_name("none.json"))), gpu_alice)
    assert not [p for p in found if "ZeRO-3" in p], found
    assert [p.replace("ds.json", "X") for p in found] == [p.replace("none.json", "X") for p in absent]


# -- 11. a dataset folder never holds the worker's locks or set-aside attempts -----------------


@pytest.mark.parametrize("folder", ["runs/lockkeeper", "runs/lockkeeper/sub"])
def test_a_dataset_folder_with_locks_or_set_aside_attempts_is_refused(tiny, volume, folder):
    area = volume / "runs" / "lockkeeper"
    (area / "sub" / "r1").mkdir(parents=True, exist_ok=True)
    (area / "sub" / "r1" / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (area / "sub" / "r1.lock").write_text("{}")
    (area / "sub" / "r0.previous-20260101-000000").mkdir(exist_ok=True)
    keeper = ArgsContext(roots=make_roots(volume, REPO_ROOT / "examples", "lockkeeper"), hardware=CPU_ONLY)
    for key in ("datasets", "test_datasets"):
        extra = {"val_set_size": 0} if key == "test_datasets" else {}
        found = problems(tiny_args(tiny, **extra, **{key: [{"path": folder, "type": "alpaca", "ds_type": "json"}]}), keeper)
        assert "lock files or set-aside attempts" in only(found, f"args.{key}[0].path")
    ok = problems(tiny_args(tiny, datasets=[{"path": "runs/lockkeeper/sub/r1", "type": "alpaca", "ds_type": "json"}]), keeper)
    assert not [p for p in ok if p.startswith("args.datasets[0].path")], ok


# -- 12. writing to the Hub with the endpoint's own token ----------------------------------------


@pytest.mark.parametrize("option, extra", [("push_dataset_to_hub", {"hf_use_auth_token": True}), ("trackio_space_id", {})])
def test_hub_writes_from_the_config_need_the_jobs_own_token(tiny, volume, option, extra):
    """The training child's HF_TOKEN falls back to the endpoint's: without this check a
    job could push a dataset (or a Trackio Space) into any repo the operator's token can write."""
    settings = WorkerSettings(base_volume=volume, hf_token="hf_operatorsOwnToken0000")
    raw = {"user_id": "alice", "model_id": "m", "run_id": "r3", "args": tiny_args(tiny, **{option: "victim-org/thing"}, **extra)}
    with pytest.raises(JobError) as caught:
        validate_job(raw, settings, CPU_ONLY)
    assert any(d.startswith(f"args.{option}:") and "credentials.hf_token" in d for d in caught.value.details), caught.value.details
    raw["credentials"] = {"hf_token": "hf_usersOwnToken00000000"}
    try:
        validate_job(raw, settings, CPU_ONLY)
    except JobError as exc:
        assert not [d for d in exc.details if d.startswith(f"args.{option}:")], exc.details
