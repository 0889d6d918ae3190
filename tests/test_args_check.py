"""The `args` section against Axolotl's own schema and the worker's rules."""

from pathlib import Path

import pytest

from conftest import tiny_args
from finetune_worker.checks.args import ArgsContext, check_args
from finetune_worker.checks.paths import make_roots
from finetune_worker.contract.settings import REPO_ROOT
from finetune_worker.host.hardware import CPU_ONLY, Hardware

ONE_GPU = Hardware(gpu_count=1, gpu_names=("H100",), gpu_memory_bytes=(80 * 2**30,), bf16=True)


@pytest.fixture
def ctx(volume):
    return ArgsContext(roots=make_roots(volume, REPO_ROOT / "examples"), hardware=CPU_ONLY)


def problems(args, ctx):
    return [str(p) for p in check_args(args, ctx)[1]]


def test_valid_tiny_config_has_no_problems(tiny, ctx):
    checked, found = check_args(tiny_args(tiny), ctx)
    assert found == []
    assert checked["base_model"] == str((tiny / "tiny-llama").resolve())


def test_misspelt_dataset_type_gets_a_suggestion(tiny, ctx):
    args = tiny_args(tiny, datasets=[{"path": str(tiny / "tiny_alpaca.jsonl"), "type": "alpacca"}])
    assert problems(args, ctx) == ["args.datasets[0].type: unknown type 'alpacca'; did you mean 'alpaca'?"]


@pytest.mark.parametrize("kind", ["alpaca", "alpaca:chat", "chat_template", "completion", "input_output", "alpaca_chat.load_qa", "messages"])
def test_known_dataset_types_pass(tiny, ctx, kind):
    args = tiny_args(tiny, datasets=[{"path": str(tiny / "tiny_alpaca.jsonl"), "type": kind}])
    assert not [p for p in problems(args, ctx) if ".type" in p]


def test_user_defined_dataset_type_passes(tiny, ctx):
    custom = {"field_instruction": "instruction", "field_output": "output", "format": "{instruction}\n", "no_input_format": "{instruction}\n"}
    args = tiny_args(tiny, datasets=[{"path": str(tiny / "tiny_alpaca.jsonl"), "type": custom}])
    assert problems(args, ctx) == []


def test_unknown_keys_are_caught_with_suggestions(tiny, ctx):
    args = tiny_args(tiny, lerning_rate=1e-4)
    args["datasets"][0]["feild_messages"] = "q"
    found = problems(args, ctx)
    assert "args.lerning_rate: unknown option; did you mean 'learning_rate'? (Axolotl would silently ignore it)" in found
    assert "args.datasets[0].feild_messages: unknown field; did you mean 'field_messages'?" in found


def test_axolotl_schema_errors_carry_their_path(tiny, ctx):
    args = tiny_args(tiny, num_epochs="three")
    del args["base_model"]
    found = problems(args, ctx)
    assert "args.base_model: required field is missing" in found
    assert any(p.startswith("args.num_epochs: ") for p in found)


def test_all_problems_together(tiny, ctx):
    args = tiny_args(tiny, datasets=[{"path": "mhenrichsen/alpaca_2k_test", "type": "alpacca"}], lerning_rate=1)
    del args["base_model"]
    found = problems(args, ctx)
    assert found[0] == "args.datasets[0].type: unknown type 'alpacca'; did you mean 'alpaca'?"
    assert "args.base_model: required field is missing" in found
    assert any(p.startswith("args.lerning_rate") for p in found)


def test_datasets_must_be_a_list_of_objects(tiny, ctx):
    assert problems(tiny_args(tiny, datasets="alpaca.jsonl"), ctx) == ["args.datasets: must be a non-empty list of dataset objects"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/etc/passwd", "absolute paths must be inside the allowed roots"),
        ("../../etc/passwd", "must not contain '..'"),
        ("data/missing.jsonl", "not found under"),
        ("file:///etc/passwd", "URL is not accepted"),
        ("http://example.com/data.jsonl", "URL is not accepted"),
    ],
)
def test_dataset_paths_are_confined(tiny, ctx, value, message):
    args = tiny_args(tiny, datasets=[{"path": value, "type": "alpaca"}])
    found = problems(args, ctx)
    assert len(found) == 1 and found[0].startswith("args.datasets[0].path: ") and message in found[0]


def test_relative_paths_resolve_on_the_volume_then_the_bundled_examples(tiny, ctx, volume):
    args = tiny_args(tiny, base_model="examples/tiny-llama", datasets=[{"path": "assets/tiny_alpaca.jsonl", "type": "alpaca"}])
    checked, found = check_args(args, ctx)
    assert found == []
    assert checked["base_model"] == str((REPO_ROOT / "examples" / "tiny-llama").resolve())
    assert checked["datasets"][0]["path"] == str((volume / "assets" / "tiny_alpaca.jsonl").resolve())


def test_hub_ids_stay_hub_ids(tiny, ctx):
    checked, found = check_args(tiny_args(tiny, base_model="NousResearch/Llama-3.2-1B"), ctx)
    assert found == [] and checked["base_model"] == "NousResearch/Llama-3.2-1B"


def test_symlink_out_of_the_volume_is_rejected(tiny, ctx, volume):
    link = volume / "escape"
    if not link.exists():
        link.symlink_to("/etc")
    found = problems(tiny_args(tiny, datasets=[{"path": str(link / "passwd"), "type": "alpaca"}]), ctx)
    assert "inside the allowed roots" in found[0]


def test_plugins_only_from_axolotl_integrations(tiny, ctx):
    args = tiny_args(tiny, plugins=["os.system", "axolotl.integrations.ligr.LigerPlugin", "axolotl.integrations.liger.LigerPlugin"])
    found = problems(args, ctx)
    assert found[0].startswith("args.plugins[0]: only Axolotl's bundled integrations")
    assert found[1] == "args.plugins[1]: no such integration 'ligr'; did you mean 'liger'?"
    assert len(found) == 2


def test_trust_remote_code_waits_for_the_model_config(tiny, ctx):
    """The model's own flag passes the args check: the base model's config.json decides
    later (test_axolotl_upgrade.py); inside a mapping it is refused here, as ever."""
    assert problems(tiny_args(tiny, trust_remote_code=True), ctx) == []
    assert problems(tiny_args(tiny, model_kwargs={"trust_remote_code": True}), ctx)[0].startswith("args.model_kwargs.trust_remote_code: runs code")
    allowed = ArgsContext(ctx.roots, CPU_ONLY, allow_trust_remote_code=True)
    assert problems(tiny_args(tiny, trust_remote_code=True), allowed) == []


def test_quantised_loading_fails_on_cpu_but_not_on_gpu(tiny, ctx):
    args = tiny_args(tiny, adapter="qlora", load_in_4bit=True)
    found = problems(args, ctx)
    assert "args.load_in_4bit: 4-bit loading needs a CUDA GPU" in found[0]
    assert found[1].startswith("args.adapter: qlora needs a CUDA GPU")
    gpu = ArgsContext(ctx.roots, ONE_GPU)
    assert problems(args, gpu) == []


def test_worker_owned_keys_are_not_validated_as_paths(tiny, ctx):
    assert problems(tiny_args(tiny, output_dir="/somewhere/else", dataset_prepared_path="../x"), ctx) == []


def test_check_does_not_modify_the_callers_args(tiny, ctx):
    args = tiny_args(tiny, base_model="examples/tiny-llama")
    check_args(args, ctx)
    assert args["base_model"] == "examples/tiny-llama"


def test_examples_dir_is_the_repo_examples():
    assert (REPO_ROOT / "examples" / "tiny-llama" / "config.json").is_file()
    assert Path(REPO_ROOT / "test_input.json").is_file()


LIGER = "axolotl.integrations.liger.LigerPlugin"


def test_plugin_validators_run_as_in_axolotl_train(tiny, ctx):
    """Axolotl adds a plugin's validators only once the plugin is registered: Liger's
    refuses its GLU kernel with tiled MLP, which the training child would reject."""
    args = tiny_args(tiny, plugins=[LIGER], liger_glu_activation=True, tiled_mlp=True)
    found = problems(args, ctx)
    assert found == ["args: You cannot have both `liger_glu_activation` and `tiled_mlp` set without `tiled_mlp_use_original_mlp: true`."]
    assert problems({**args, "tiled_mlp_use_original_mlp": True}, ctx) == []


def test_a_plugin_adapter_is_known_once_its_plugin_is_registered(tiny, ctx):
    args = tiny_args(tiny, plugins=["axolotl.integrations.mora.MoraPlugin"], adapter="mora")
    assert problems(args, ctx) == []


def test_plugin_registration_does_not_leak_into_the_next_check():
    from axolotl.integrations.base import PluginManager

    from finetune_worker.checks import axolotl_schema

    manager = PluginManager.get_instance()
    before = dict(manager.plugins)
    config = {"base_model": "org/m", "learning_rate": 1e-4, "datasets": [{"path": "org/d", "type": "alpaca"}]}
    conflict = {**config, "liger_glu_activation": True, "tiled_mlp": True}
    assert axolotl_schema.schema_problems({**conflict, "plugins": [LIGER]}, (LIGER,)) != []
    assert dict(manager.plugins) == before
    # the same keys without the plugin: Liger's validator is gone (Axolotl ignores the unknown keys)
    assert axolotl_schema.schema_problems({**conflict, "plugins": ["x.Y"]}, ()) == []
    assert "liger_glu_activation" not in axolotl_schema.input_config_model().model_fields
    assert "liger_glu_activation" in axolotl_schema.input_config_model((LIGER,)).model_fields
    assert "liger_glu_activation" in axolotl_schema.known_keys((LIGER,)) - axolotl_schema.known_keys()
    with axolotl_schema.registered_plugins((LIGER,)):
        assert list(manager.plugins) == [LIGER]
    assert dict(manager.plugins) == before


def test_only_plugin_classes_are_registered(tiny, ctx):
    """Registering a plugin instantiates it: a function of an integration module is not a plugin."""
    from finetune_worker.checks import axolotl_schema

    name = "axolotl.integrations.liger.plugin.get_logger"
    assert problems(tiny_args(tiny, plugins=[name]), ctx) == [
        "args.plugins[0]: 'get_logger' in axolotl.integrations.liger.plugin is not an Axolotl plugin class"
    ]
    with pytest.raises(ValueError, match="cannot be registered"):
        with axolotl_schema.registered_plugins(("os.system",)):
            pass


def test_gptq_on_cpu_names_its_own_kernels_not_bitsandbytes(tiny, ctx):
    found = problems(tiny_args(tiny, gptq=True), ctx)
    assert found[0] == (
        "args.gptq: GPTQ needs a CUDA GPU (GPTQ kernels) and this worker has none; "
        "use adapter: lora without quantised loading, or run on a GPU worker"
    )


def test_cuda_only_plugins_are_adapted_on_cpu_not_refused(tiny, ctx):
    """On CPU the plan removes Liger (with its options); the check must not refuse it first."""
    args = tiny_args(tiny, plugins=[LIGER], liger_rms_norm=True)
    assert problems(args, ctx) == []


A100 = Hardware(gpu_count=1, gpu_names=("NVIDIA A100-SXM4-80GB",), gpu_memory_bytes=(80 * 2**30,), bf16=True, compute_capability=(8, 0))
H100 = Hardware(gpu_count=1, gpu_names=("NVIDIA H100 80GB HBM3",), gpu_memory_bytes=(80 * 2**30,), bf16=True, compute_capability=(9, 0))


def test_axolotl_checks_the_config_with_this_gpus_capabilities(tiny, volume):
    """`axolotl train` passes the GPU's capabilities to Axolotl's validation: fp8 needs
    Hopper (sm_90), so an A100 worker refuses it up front, as the training would."""
    args = tiny_args(tiny, fp8=True)
    on = lambda hardware: problems(args, ArgsContext(roots=make_roots(volume, REPO_ROOT / "examples"), hardware=hardware))  # noqa: E731
    assert "args: fp8 requested, but fp8 is not supported on this GPU" in on(A100)
    assert not [p for p in on(H100) if "fp8 is not supported" in p]


def test_capabilities_are_those_axolotl_computes():
    from finetune_worker.checks.axolotl_schema import capabilities

    gpu, env = capabilities(A100)
    assert gpu == {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_80"}
    assert env["torch_version"] and "+" not in env["torch_version"]
    assert capabilities(H100, processes=4)[0]["n_gpu"] == 4 and capabilities(H100)[0]["fp8"] is True
    # Where CUDA is unavailable Axolotl finds no bf16, fp8, tf32 nor compute capability.
    assert capabilities(CPU_ONLY)[0] == {"bf16": False, "fp8": False, "tf32": False, "n_gpu": 1, "compute_capability": None}


def checked_with_notes(args, ctx):
    ctx.notes.clear()
    checked, found = check_args(args, ctx)
    return checked, [str(p) for p in found], list(ctx.notes)


@pytest.mark.parametrize("typo", [{"lora_dropuot": 0}, {"warmup_step": 0}, {"lora_dropuot": 0.0}])
def test_a_misspelt_option_set_to_zero_is_reported_not_dropped(tiny, ctx, typo):
    (key,) = typo
    checked, found, notes = checked_with_notes(tiny_args(tiny, **typo), ctx)
    assert [p for p in found if p.startswith(f"args.{key}: unknown option; did you mean '")] and key in checked
    assert notes == []


@pytest.mark.parametrize(("key", "hint"), [("epochs", "num_epochs"), ("context_parapllel_size", "context_parallel_size")])
def test_unknown_options_get_a_hint(tiny, ctx, key, hint):
    _, found, _ = checked_with_notes(tiny_args(tiny, **{key: 2}), ctx)
    assert f"args.{key}: unknown option; did you mean '{hint}'? (Axolotl would silently ignore it)" in found


def test_no_misleading_hint_for_options_without_a_near_name(tiny, ctx):
    _, found, notes = checked_with_notes(tiny_args(tiny, train_on_split="train", sample_packing_seq_len_multiplier=2), ctx)
    assert found == ["args.train_on_split: unknown option (Axolotl would silently ignore it)"]
    assert notes == ["args.sample_packing_seq_len_multiplier is an option of Axolotl before 0.5; Axolotl 0.21.0 ignores it, so it is dropped"]


@pytest.mark.parametrize(("extra", "note"), [
    ({"debug": None}, "args.debug is an option of Axolotl before 0.5; Axolotl 0.21.0 ignores it, so it is dropped"),
    ({"gptq_model_v1": True}, "args.gptq_model_v1 is an option of Axolotl before 0.5; Axolotl 0.21.0 ignores it, so it is dropped"),
    ({"eta_min": 1e-6}, "args.eta_min is an option of Axolotl before 0.5; Axolotl 0.21.0 ignores it, so it is dropped"),
    ({"adam_eps": 1e-8}, "args.adam_eps is an option of Axolotl before 0.5; Axolotl 0.21.0 ignores it, so it is dropped"),
    ({"test_value": True}, "args.test_value is an option of Axolotl before 0.5; Axolotl 0.21.0 ignores it, so it is dropped"),
    ({"lora_dropuot": None}, "args.lora_dropuot is empty (null, false or empty); Axolotl 0.21.0 ignores it, so it is dropped"),
    ({"cut_cross_entropy": False}, "args.cut_cross_entropy is off and belongs to the plugin "
                                   "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin, which plugins does not list; "
                                   "Axolotl 0.21.0 ignores it, so it is dropped"),
])
def test_ignored_options_are_dropped_with_a_note(tiny, ctx, extra, note):
    checked, found, notes = checked_with_notes(tiny_args(tiny, **extra), ctx)
    assert found == [] and notes == [note] and not set(extra) & set(checked)


def test_cut_cross_entropy_without_its_plugin_says_to_add_the_plugin(tiny, ctx):
    checked, found, notes = checked_with_notes(tiny_args(tiny, cut_cross_entropy=True, bf16=True), ctx)
    assert found == ["args.cut_cross_entropy: needs its plugin, which Axolotl loads only when listed: add plugins: "
                     "[axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin] (without it Axolotl would silently ignore the option), "
                     "or remove it"]
    assert notes == []


def test_hub_data_files_are_file_names_inside_the_repo_and_come_back_unchanged(tiny, ctx):
    files = ["data/train-00000.jsonl", "data/train-00001.jsonl"]
    args = tiny_args(tiny, datasets=[{"path": "my-org/mixed-data", "data_files": files, "type": "alpaca"},
                                     {"path": "my-org/one-file", "data_files": "train.jsonl", "type": "alpaca"}])
    checked, found = check_args(args, ctx)
    assert found == []
    assert checked["datasets"][0]["data_files"] == files and checked["datasets"][1]["data_files"] == "train.jsonl"
    assert checked["datasets"][0]["path"] == "my-org/mixed-data"


@pytest.mark.parametrize("value", ["../x.jsonl", "data/../../x.jsonl", "/x.jsonl", "/etc/passwd"])
def test_a_hub_data_file_outside_its_repo_is_refused(tiny, ctx, value):
    args = tiny_args(tiny, datasets=[{"path": "my-org/mixed-data", "data_files": ["ok.jsonl", value], "type": "alpaca"}])
    assert problems(args, ctx) == ["args.datasets[0].data_files[1]: must be a relative file name inside the Hub dataset repo "
                                   "my-org/mixed-data (e.g. data/train.jsonl)"]


@pytest.mark.parametrize(("qat", "path", "dtype"), [
    ({"weight_dtype": "nvfp4", "activation_dtype": "int8"}, "args.qat.weight_dtype", "nvfp4"),
    ({"weight_dtype": "mxfp4"}, "args.qat.weight_dtype", "mxfp4"),
    ({"weight_dtype": "int8", "activation_dtype": "fp8", "group_size": 32}, "args.qat.activation_dtype", "fp8"),
])
def test_low_precision_qat_is_refused_on_cpu_with_what_to_do(tiny, ctx, qat, path, dtype):
    args = tiny_args(tiny, qat=qat)
    del args["adapter"]
    assert f"{path}: {dtype} fake quantisation needs a CUDA GPU (torchao's low-precision kernels) and this worker has none; " \
           "remove qat, or run on a GPU worker" in problems(args, ctx)


def test_context_parallel_is_refused_on_cpu_with_what_to_do(tiny, ctx):
    found = problems(tiny_args(tiny, context_parallel_size=2, micro_batch_size=1), ctx)
    assert "args.context_parallel_size: context parallelism splits each sequence across GPUs (ring-flash-attention) and this worker " \
           "has none; remove context_parallel_size, or run on a GPU worker with at least 2 GPUs" in found
