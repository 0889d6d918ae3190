"""What ships: the image recipe, the RunPod Hub listing, the published input schema."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from finetune_worker.checks.validation import validate_job
from finetune_worker.contract import schema
from finetune_worker.contract.envconfig import args_from_env
from finetune_worker.contract.settings import REPO_ROOT, WorkerSettings
from finetune_worker.host.hardware import Hardware

ONE_GPU = Hardware(gpu_count=1, gpu_names=("NVIDIA GeForce RTX 4090",), gpu_memory_bytes=(24 * 2**30,), bf16=True)
DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


def test_published_job_input_schema_is_current():
    committed = (REPO_ROOT / "docs" / "job-input.schema.json").read_text()
    assert committed == schema.render(), "regenerate it: python -m finetune_worker.contract.schema > docs/job-input.schema.json"
    properties = json.loads(committed)["properties"]
    assert {"user_id", "model_id", "run_id", "credentials", "args", "publish", "restart"} <= set(properties)


def test_image_runs_the_handler_outside_workspace_without_secrets():
    assert 'CMD ["python", "-u", "src/handler.py"]' in DOCKERFILE
    assert re.search(r"^WORKDIR /app$", DOCKERFILE, re.M)
    assert not re.search(r"^WORKDIR /workspace", DOCKERFILE, re.M)
    instructions = DOCKERFILE.replace("\\\n", " ").splitlines()  # join continuation lines
    for instruction in instructions:
        if instruction.startswith(("ENV", "ARG")):  # these persist in the image's layers and metadata
            assert not re.search(r"(HF_TOKEN|WANDB_API_KEY|RUNPOD_API_KEY|RUNPOD_AI_API_KEY)\s*=", instruction), instruction
    assert "--mount=type=secret,id=hf_token" in DOCKERFILE  # a gated prebake model uses a build secret


def test_dockerignore_keeps_tests_caches_and_runs_out():
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for entry in (".git", "tests", ".venv", "volume", "**/__pycache__", ".env"):
        assert entry in ignored


def test_base_image_matches_the_tested_engine():
    sys.path.insert(0, str(REPO_ROOT / "builder"))
    try:
        import check_versions
    finally:
        sys.path.pop(0)
    assert check_versions.problems() == []


@pytest.fixture
def gpu_settings(tmp_path):
    return WorkerSettings(base_volume=tmp_path, examples_dir=REPO_ROOT / "examples")


def test_hub_smoke_test_is_a_valid_tiny_gpu_job(gpu_settings):
    tests = json.loads((REPO_ROOT / ".runpod" / "tests.json").read_text())
    for case in tests["tests"]:
        valid = validate_job(case["input"], gpu_settings, ONE_GPU)
        assert valid.args["max_steps"] <= 20 and valid.args["base_model"].endswith("examples/tiny-llama")
        assert case["timeout"] >= 5 * 60 * 1000
    args = {case["name"]: case["input"]["args"] for case in tests["tests"]}
    # on the real GPU: a plain LoRA job that leaves precision to the worker's fast defaults, and QLoRA
    assert args["tiny_lora_fast_defaults_on_gpu"]["bf16"] == "auto" and args["tiny_lora_fast_defaults_on_gpu"]["adapter"] == "lora"
    assert args["tiny_qlora_4bit"]["adapter"] == "qlora" and args["tiny_qlora_4bit"]["load_in_4bit"] is True


def test_hub_listing_env_and_presets_make_valid_jobs(gpu_settings):
    hub = json.loads((REPO_ROOT / ".runpod" / "hub.json").read_text())
    keys = [entry["key"] for entry in hub["config"]["env"]]
    assert {"HF_TOKEN", "WANDB_API_KEY"} <= set(keys)
    assert hub["type"] == "serverless" and hub["category"] == "language"
    assert hub["config"]["containerDiskInGb"] >= 100
    dataset = {"datasets": [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}]}
    for preset in hub["config"]["presets"]:
        env = {key: value if isinstance(value, str) else json.dumps(value) for key, value in preset["defaults"].items()}
        defaults, _, problems = args_from_env(env)
        assert problems == [], preset["name"]
        settings = gpu_settings.model_copy(update={"default_args": defaults})
        job = {"user_id": "u", "model_id": "m", "run_id": "r", "args": dataset}
        valid = validate_job(job, settings, ONE_GPU)
        assert valid.args["base_model"] == preset["defaults"]["AXOLOTL_BASE_MODEL"]
        assert "base_model" in valid.defaults_used


def test_workflows_publish_dev_preview_and_release_tags():
    workflows = REPO_ROOT / ".github" / "workflows"
    main, release, tests = ((workflows / name).read_text() for name in ("main.yml", "release.yml", "tests.yml"))
    assert "branches: [main]" in main and "TAG: dev" in main and "docker buildx bake --push" in main
    assert "types: [published]" in release and "tag=preview" in release and "workflow_dispatch" in release
    assert "pull_request" in tests and "bash .ci/run" in tests
    for text in (main, release):
        assert "uses: ./.github/workflows/tests.yml" in text
        assert "${{ vars.REGISTRY }}" in text and "${{ secrets.REGISTRY_TOKEN }}" in text
    bake = (REPO_ROOT / "docker-bake.hcl").read_text()
    assert 'target "worker"' in bake and "${REGISTRY}/${IMAGE_NAME}:${TAG}" in bake


def test_ci_runs_the_readme_test_command():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make run" in readme
    assert Path(REPO_ROOT / "Makefile").read_text().count("check-jsonschema") >= 3
