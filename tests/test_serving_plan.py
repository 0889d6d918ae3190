"""The pure half of serving: vLLM and transformers serve argv, VLLM_* overrides, the deploy recipe and its model-card section.

vLLM cannot run on this machine (no CUDA); its command lines are checked here as argv lists.
"""

from __future__ import annotations

import json
import shlex

import pytest

from finetune_worker.plan.serving import (
    SERVE_API_KEY,
    Served,
    build_server_argv,
    run_recipe,
    serve_options,
    server_env,
    vllm_lora_rank,
    with_overrides,
)
from finetune_worker.publish.card import deploy_section

CONFIG = {"base_model": "meta-llama/Llama-3.2-1B", "adapter": "lora", "lora_r": 32, "sequence_len": 4096}


def test_vllm_argv_for_an_adapter_enables_lora_with_the_runs_rank_and_length():
    options = serve_options(CONFIG, "support-bot", lora_rank=32, adapter=True)
    argv = build_server_argv("vllm", Served("meta-llama/Llama-3.2-1B", adapter="/v/runs/u/r/output"), options, "0.0.0.0", 8000)
    assert argv == ["vllm", "serve", "meta-llama/Llama-3.2-1B", "--enable-lora", "--lora-modules=support-bot=/v/runs/u/r/output",
                    "--max-lora-rank=32", "--max-model-len=4096", "--host=0.0.0.0", "--port=8000"]


def test_vllm_argv_for_merged_or_full_weights_names_the_served_model():
    options = serve_options({**CONFIG, "adapter": None}, "support-bot", lora_rank=None, adapter=False)
    argv = build_server_argv("vllm", Served("/v/runs/u/r/output/merged"), options, "127.0.0.1", 9000)
    assert argv == ["vllm", "serve", "/v/runs/u/r/output/merged", "--served-model-name=support-bot",
                    "--max-model-len=4096", "--host=127.0.0.1", "--port=9000"]
    assert "--enable-lora" not in argv


def test_no_value_from_a_run_can_read_as_an_option():
    """A served name or a directory starting with '-' stays a value: options are `--opt=value`,
    and a model path that starts with '-' gets './'."""
    options = serve_options({"sequence_len": 64}, "--api-key=x", lora_rank=8, adapter=True)
    argv = build_server_argv("vllm", Served("-base", adapter="--enable-lora"), options, "127.0.0.1", 8000)
    assert argv[:4] == ["vllm", "serve", "./-base", "--enable-lora"]
    assert "--lora-modules=--api-key=x=--enable-lora" in argv and argv.count("--enable-lora") == 1
    full = build_server_argv("vllm", Served("/m"), serve_options({}, "-x", None, False), "127.0.0.1", 8000)
    assert "--served-model-name=-x" in full and "-x" not in full
    assert build_server_argv("transformers", Served("-merged"), options, "h", 1)[2] == "./-merged"
    recipe = run_recipe({"base_model": "/b"}, "-bot", "-weights", adapter=False, lora_rank=None)
    assert shlex.split(recipe["transformers_serve"]) == ["transformers", "serve", "./-weights"]
    assert "--served-model-name=-bot" in shlex.split(recipe["vllm_serve"])


def test_the_api_key_goes_to_vllm_through_its_environment_only():
    """FINETUNE_SERVE_API_KEY becomes vLLM's VLLM_API_KEY (vLLM then checks `Authorization: Bearer`);
    never argv. transformers serve cannot check one, so a key with it is refused."""
    key = "CANARYserveApiKey0001"
    env = {"PATH": "/bin", SERVE_API_KEY: key, "VLLM_MAX_MODEL_LEN": "64"}
    assert server_env("vllm", env) == {"PATH": "/bin", "VLLM_API_KEY": key}
    assert server_env("vllm", {"PATH": "/bin", "VLLM_API_KEY": key}) == {"PATH": "/bin", "VLLM_API_KEY": key}
    assert server_env("vllm", {"PATH": "/bin"}) == {"PATH": "/bin"} == server_env("transformers", {"PATH": "/bin"})
    with pytest.raises(ValueError, match="transformers serve has no API key"):
        server_env("transformers", env)
    options, _ = with_overrides(serve_options(CONFIG, "bot", 32, True), env)
    assert not any(key in word for word in build_server_argv("vllm", Served("b", adapter="/a"), options, "0.0.0.0", 8000))


@pytest.mark.parametrize(("rank", "vllm_rank"), [(None, 16), (4, 8), (8, 8), (17, 32), (300, 320), (1024, 512)])
def test_an_adapters_rank_is_rounded_up_to_one_vllm_accepts(rank, vllm_rank):
    assert vllm_lora_rank(rank) == vllm_rank


def test_vllm_overrides_come_from_the_environment_and_bad_ones_are_named():
    options = serve_options(CONFIG, "bot", lora_rank=32, adapter=True)
    env = {"VLLM_MAX_MODEL_LEN": "8192", "VLLM_GPU_MEMORY_UTILIZATION": "0.85", "VLLM_MAX_LORA_RANK": "64",
           "VLLM_SERVED_MODEL_NAME": "prod", "VLLM_CONFIG_FILE": "/workspace/vllm.yaml", "VLLM_EXTRA_ARGS": "--enforce-eager --max-num-seqs 8"}
    changed, problems = with_overrides(options, env)
    assert problems == []
    argv = build_server_argv("vllm", Served("base", adapter="/a"), changed, "h", 1)
    assert argv[:5] == ["vllm", "serve", "base", "--enable-lora", "--lora-modules=prod=/a"]
    assert "--max-lora-rank=64" in argv and "--max-model-len=8192" in argv and "--gpu-memory-utilization=0.85" in argv
    assert argv[argv.index("--config") + 1] == "/workspace/vllm.yaml"
    assert argv[-5:] == ["--enforce-eager", "--max-num-seqs", "8", "--host=h", "--port=1"]
    _, problems = with_overrides(options, {"VLLM_MAX_MODEL_LEN": "lots", "VLLM_GPU_MEMORY_UTILIZATION": "1.5", "VLLM_MAX_LORA_RANK": "12"})
    assert len(problems) == 3
    assert any(p.startswith("VLLM_MAX_MODEL_LEN='lots'") for p in problems)
    assert any(p.startswith("VLLM_GPU_MEMORY_UTILIZATION='1.5'") and "at most 1" in p for p in problems)
    assert any(p.startswith("VLLM_MAX_LORA_RANK=12") and "320" in p for p in problems)


def test_transformers_serve_takes_full_weights_only():
    options = serve_options(CONFIG, "bot", 32, True)
    assert build_server_argv("transformers", Served("/merged"), options, "127.0.0.1", 8001) == [
        "transformers", "serve", "/merged", "--host=127.0.0.1", "--port=8001"]
    with pytest.raises(ValueError, match="merge the LoRA first"):
        build_server_argv("transformers", Served("base", adapter="/a"), options, "127.0.0.1", 8001)


def test_the_recipe_of_a_pushed_adapter_sets_runpods_vllm_worker():
    recipe = run_recipe(CONFIG, "support-bot", "me/support-bot-lora", adapter=True, lora_rank=32)
    env = recipe["runpod_vllm_worker"]["env"]
    assert env == {"MODEL_NAME": "meta-llama/Llama-3.2-1B", "ENABLE_LORA": "true", "MAX_LORA_RANK": "32", "MAX_MODEL_LEN": "4096",
                   "LORA_MODULES": json.dumps([{"name": "support-bot", "path": "me/support-bot-lora"}])}
    assert shlex.split(recipe["vllm_serve"]) == ["vllm", "serve", "meta-llama/Llama-3.2-1B", "--enable-lora",
                                                 "--lora-modules=support-bot=me/support-bot-lora", "--max-lora-rank=32", "--max-model-len=4096"]
    assert recipe["transformers_serve"] is None and "merge" in recipe["note"]


def test_the_recipe_of_a_full_fine_tune_and_of_merged_weights():
    full = run_recipe({**CONFIG, "adapter": None}, "bot", "me/bot-full", adapter=False, lora_rank=None)
    assert full["runpod_vllm_worker"]["env"] == {"MODEL_NAME": "me/bot-full", "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "bot", "MAX_MODEL_LEN": "4096"}
    assert full["transformers_serve"] == "transformers serve me/bot-full"
    merged = run_recipe(CONFIG, "bot", "me/bot-lora", adapter=True, lora_rank=8, merged="me/bot-merged")
    assert merged["transformers_serve"] == "transformers serve me/bot-merged"
    assert merged["merged"]["runpod_vllm_worker"]["env"]["MODEL_NAME"] == "me/bot-merged"
    assert "--enable-lora" not in merged["merged"]["vllm_serve"]


def test_the_model_card_says_how_to_deploy():
    text = "\n".join(deploy_section(run_recipe(CONFIG, "support-bot", "me/support-bot-lora", adapter=True, lora_rank=32)))
    assert "## Deploy it" in text and "ENABLE_LORA=true" in text
    assert "LORA_MODULES='[{\"name\": \"support-bot\", \"path\": \"me/support-bot-lora\"}]'" in text
    assert "vllm serve meta-llama/Llama-3.2-1B --enable-lora" in text
    assert deploy_section(None) == []


def test_the_pods_serve_switches_are_not_axolotl_options():
    from finetune_worker.contract.envconfig import args_from_env

    args, _, problems = args_from_env({"AXOLOTL_SERVE": "true", "AXOLOTL_SERVE_PORT": "8001", "AXOLOTL_AUTORUN": "true"})
    assert args == {} and problems == []


def test_serve_refuses_what_it_cannot_serve_before_starting_anything(tmp_path, capsys):
    from finetune_worker.serve.server import serve

    assert serve("nobody/nothing", runs_dir=tmp_path, env={}, server="transformers") == 2
    assert "has no run 'nothing'" in capsys.readouterr().err
    assert serve(str(tmp_path / "missing"), runs_dir=tmp_path, env={}) == 2
    assert "no such directory" in capsys.readouterr().err
    run = tmp_path / "pod"
    (run / "outputs").mkdir(parents=True)
    (run / "config.yaml").write_text(f"base_model: x\nadapter: lora\noutput_dir: {run / 'outputs'}\n")
    assert serve(str(run), runs_dir=tmp_path, env={}) == 2
    assert "left no LoRA adapter" in capsys.readouterr().err
    (run / "outputs" / "adapter_config.json").write_text("{}")
    assert serve(str(run), runs_dir=tmp_path, env={"VLLM_MAX_LORA_RANK": "12"}, server="vllm") == 2
    assert "VLLM_MAX_LORA_RANK=12" in capsys.readouterr().err


def test_the_model_card_never_shows_a_local_base_models_path():
    recipe = run_recipe({**CONFIG, "base_model": "/runpod-volume/models/my-llama"}, "bot", "me/bot-lora", adapter=True, lora_rank=8)
    text = "\n".join(deploy_section(recipe, local_base="my-llama"))
    assert "/runpod-volume" not in text
    assert "MODEL_NAME='<my-llama>'" in text and "vllm serve <my-llama> --enable-lora" in text
    assert "replace `<my-llama>`" in text


def test_merged_weights_stop_at_the_chat_templates_end_of_turn(tmp_path):
    """A chat fine-tune of a base model ends answers with <|im_end|> while its eos stays </s>:
    the merged weights' generation_config lists both, so servers stop where the answer ends."""
    from finetune_worker.host.rundir import copy_run_tokenizer

    output, merged = tmp_path / "output", tmp_path / "output" / "merged"
    merged.mkdir(parents=True)
    added = [{"id": 2, "content": "</s>", "special": True}, {"id": 5, "content": "<|im_end|>", "special": True},
             {"id": 6, "content": "<|eot_id|>", "special": False}]
    (output / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    (output / "chat_template.jinja").write_text("{{ messages }}")
    (merged / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 3}))
    copy_run_tokenizer(output, merged)
    assert (merged / "chat_template.jinja").read_text() == "{{ messages }}"
    assert json.loads((merged / "generation_config.json").read_text()) == {"eos_token_id": [2, 5], "pad_token_id": 3}
