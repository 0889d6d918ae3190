"""A shared endpoint (user tokens): the operator's fallback HF_TOKEN and WANDB_API_KEY never
write for a tenant outside the namespace the operator allowed for that user.

The operator's token is an admin of the organisation `acme` (and the user `operator`) on a
loopback Hub (tests/fake_hub.py), which holds another tenant's adapter (operator/bob-model)
and the organisation's production weights (acme/prod-model). Every refusal comes before
training, so these jobs stop at the refusal, or at the Hub check (collect_until): nothing
trains here. The allowed namespace pushing end to end is in test_publish.py
(test_transient_hub_errors_are_retried_and_a_tenant_publishes_in_its_namespace).
"""

from __future__ import annotations

import json
import time

import jwt
import pytest
import yaml

from conftest import collect, collect_until, make_job, tiny_args, training_pids
from fake_hub import FakeHub, user
from finetune_worker.checks import tenancy
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.job import JobInput
from finetune_worker.contract.settings import WorkerSettings
from finetune_worker.plan.credentials import hub_and_wandb_secrets

SECRET = "operator-secret-0123456789-abcdefghijklmnop"
OPERATOR_TOKEN = "hf_CANARYoperatorOrgAdmin0000001"
OPERATOR_WANDB = "CANARYoperatorWandbKey000000000000000001"
TENANT = "mallory"
WRITES = ("create", "preupload", "commit", "branch")


def user_token(sub: str = TENANT) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, "HS256")


@pytest.fixture(scope="module")
def hub():
    fake = FakeHub().start()
    fake.tokens[OPERATOR_TOKEN] = user("operator", orgs=(("acme", "admin"),))
    fake.add_model("operator/bob-model", {"adapter_model.safetensors": b"bob's adapter"})
    fake.add_model("acme/prod-model", {"model.safetensors": b"production weights"})
    yield fake
    fake.close()


@pytest.fixture
def shared_env(env, hub):
    """An endpoint with user tokens whose fallback HF_TOKEN is the organisation admin's."""
    return {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "FINETUNE_USER_TOKEN_SECRET": SECRET, "HF_TOKEN": OPERATOR_TOKEN}


def tenant_job(tiny, publish: dict | None = None, **args) -> dict:
    extra = {"publish": publish} if publish else {}
    return make_job(tiny_args(tiny, **args), user_id=TENANT, credentials={"user_token": user_token()}, **extra)


def assert_refused_before_training(evs: list[dict], hub: FakeHub, writes_before: int, job: dict, *needles: str) -> None:
    last = evs[-1]
    assert last["type"] == "error" and last["code"] == "auth_error", last
    text = last["message"] + " ".join(last["details"])
    for needle in needles:
        assert needle in text, text
    assert "progress" not in [e["type"] for e in evs] and training_pids(job["run_id"]) == []
    assert sum(hub.count(op) for op in WRITES) == writes_before, "nothing was written on the Hub"
    assert hub.files("operator/bob-model") == {"adapter_model.safetensors": b"bob's adapter"}
    assert hub.files("acme/prod-model") == {"model.safetensors": b"production weights"}
    assert OPERATOR_TOKEN not in json.dumps(evs)


def writes(hub: FakeHub) -> int:
    return sum(hub.count(op) for op in WRITES)


# -- the attack: a tenant without credentials names someone else's repos ---------------------


@pytest.mark.parametrize("namespace", [None, "acme"])
def test_the_operators_token_never_writes_to_another_tenants_or_the_orgs_repo(tiny, hub, shared_env, namespace):
    env = {**shared_env, **({"FINETUNE_HUB_NAMESPACE": namespace} if namespace else {})}
    before = writes(hub)
    job = tenant_job(tiny, hub_model_id="operator/bob-model")
    assert_refused_before_training(collect(job, env), hub, before, job, "args.hub_model_id: 'operator/bob-model'", "credentials.hf_token")
    job = tenant_job(tiny, hub_model_id="acme/mallory__mine", publish={"merge_lora": True, "merged_hub_model_id": "acme/prod-model"})
    evs = collect(job, env)
    assert_refused_before_training(evs, hub, before, job, "publish.merged_hub_model_id: 'acme/prod-model'")
    if namespace:
        assert "acme/mallory__<name>" in evs[-1]["message"] and "mallory__mine" not in " ".join(evs[-1]["details"])


def test_without_a_namespace_a_bare_name_is_refused_too(tiny, hub, shared_env):
    """Two tenants choosing the same bare name would share the operator user's repo."""
    before = writes(hub)
    job = tenant_job(tiny, hub_model_id="bob-model")
    evs = collect(job, shared_env)
    assert_refused_before_training(evs, hub, before, job, "writes nothing for them", "FINETUNE_HUB_NAMESPACE", "'bob-model'")


def test_in_the_namespace_a_tenant_gets_only_its_own_repos(tiny, hub, shared_env):
    env = {**shared_env, "FINETUNE_HUB_NAMESPACE": "acme"}
    before = writes(hub)
    for repo in ("acme/bob-model", "acme/bob__x", "acme/mallory__a__b", "acme/Mallory__x", "operator/mallory__x"):
        job = tenant_job(tiny, hub_model_id=repo)
        assert_refused_before_training(collect(job, env), hub, before, job, f"args.hub_model_id: {repo!r}")
    job = make_job(tiny_args(tiny, hub_model_id="x"), user_id="Mallory", credentials={"user_token": user_token("Mallory")})
    assert_refused_before_training(collect(job, env), hub, before, job, "capital letters")


def test_a_bare_name_goes_to_the_users_repo_in_the_namespace_and_every_repo_is_checked(tiny, hub, shared_env):
    env = {**shared_env, "FINETUNE_HUB_NAMESPACE": "acme"}
    before = writes(hub)
    job = tenant_job(tiny, hub_model_id="my-model", publish={"merge_lora": True, "merged_hub_model_id": "acme/mallory__my-model-merged"})
    evs = collect_until(job, env, lambda event: "may push to" in event.get("message", ""))
    messages = [e.get("message", "") for e in evs]
    assert ("hub_model_id 'my-model' has no owner; on this shared endpoint the endpoint's token writes only to "
            "acme/mallory__<name>, so it goes to acme/mallory__my-model") in messages, evs[-1]
    assert messages[-1] == "the token of 'operator' may push to acme/mallory__my-model, acme/mallory__my-model-merged"
    assert "progress" not in [e["type"] for e in evs] and writes(hub) == before


# -- every destination is checked before training, on any endpoint ----------------------------


def test_merged_hub_model_id_is_checked_before_training_with_the_jobs_token(tiny, hub, env):
    """One tenant, the job's own token: a merged repo it cannot write is refused up front
    (it used to be found out only by the push, after the training)."""
    hub.tokens["hf_aliceToken000000000000000001"] = user("alice")
    before = writes(hub)
    job = make_job(tiny_args(tiny, hub_model_id="alice/mine"), credentials={"hf_token": "hf_aliceToken000000000000000001"},
                   publish={"merge_lora": True, "merged_hub_model_id": "acme/prod-model"})
    evs = collect(job, {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
    assert_refused_before_training(evs, hub, before, job, "cannot push to acme/prod-model: the token belongs to 'alice'")


# -- W&B -----------------------------------------------------------------------------------------


def test_the_operators_wandb_key_logs_a_tenant_only_into_the_operators_entity(tiny, hub, shared_env, volume):
    env = {**shared_env, "WANDB_API_KEY": OPERATOR_WANDB, "WANDB_MODE": "offline"}
    job = tenant_job(tiny, wandb_project="theirs")
    evs = collect_until(job, env, lambda event: "run directory" in event.get("message", ""))
    assert any("W&B is off: this endpoint's own W&B key logs nothing for its users" in e["message"] for e in evs if e["type"] == "warning")
    config = yaml.safe_load((volume / "runs" / TENANT / job["run_id"] / "config.yaml").read_text())
    assert not [key for key in config if key.startswith("wandb_")]

    entity_env = {**env, "FINETUNE_WANDB_ENTITY": "operator-team"}
    evs = collect(tenant_job(tiny, wandb_entity="victim-team", wandb_project="their-project"), entity_env)
    assert evs[-1]["code"] == "auth_error" and evs[-1]["details"][0].startswith("args.wandb_entity: 'victim-team'"), evs[-1]
    job = tenant_job(tiny, wandb_project="theirs")
    evs = collect_until(job, entity_env, lambda event: "run directory" in event.get("message", ""))
    assert any("project 'mallory__theirs'" in e.get("message", "") for e in evs), [e.get("message") for e in evs]
    config = yaml.safe_load((volume / "runs" / TENANT / job["run_id"] / "config.yaml").read_text())
    assert config["wandb_entity"] == "operator-team" and config["wandb_project"] == "mallory__theirs"
    assert OPERATOR_WANDB not in json.dumps(evs)


def test_which_wandb_key_reaches_the_training():
    """The operator's key reaches a tenant's training only when the operator names an entity."""
    job = JobInput.model_validate({"user_id": "u", "model_id": "m", "run_id": "r", "args": {}})
    own = JobInput.model_validate({"user_id": "u", "model_id": "m", "run_id": "r", "args": {}, "credentials": {"wandb_api_key": "mine"}})
    single = WorkerSettings.from_env({"WANDB_API_KEY": OPERATOR_WANDB})
    shared = WorkerSettings.from_env({"WANDB_API_KEY": OPERATOR_WANDB, "FINETUNE_USER_TOKEN_SECRET": SECRET})
    with_entity = WorkerSettings.from_env({"WANDB_API_KEY": OPERATOR_WANDB, "FINETUNE_USER_TOKEN_SECRET": SECRET, "FINETUNE_WANDB_ENTITY": "team"})
    assert hub_and_wandb_secrets(job, single)[1] == OPERATOR_WANDB
    assert hub_and_wandb_secrets(job, shared)[1] is None
    assert hub_and_wandb_secrets(job, with_entity)[1] == OPERATOR_WANDB
    assert hub_and_wandb_secrets(own, shared)[1] == "mine"


# -- the rule itself -------------------------------------------------------------------------------


def settings(**env: str) -> WorkerSettings:
    return WorkerSettings.from_env({"FINETUNE_USER_TOKEN_SECRET": SECRET, "HF_TOKEN": OPERATOR_TOKEN, **env})


def parsed(user_id: str = TENANT, hf_token: str | None = None, merged: str | None = None) -> JobInput:
    return JobInput.model_validate({
        "user_id": user_id, "model_id": "m", "run_id": "r", "args": {},
        "credentials": {"hf_token": hf_token} if hf_token else {},
        "publish": {"merged_hub_model_id": merged} if merged else {},
    })


def test_the_rule_places_and_refuses():
    ns = settings(FINETUNE_HUB_NAMESPACE="acme")
    assert tenancy.hub_writes(parsed(), {"hub_model_id": "x"}, ns).repos == {"args.hub_model_id": "acme/mallory__x"}
    assert tenancy.hub_writes(parsed(), {"hub_model_id": "mallory__x"}, ns).repos == {"args.hub_model_id": "acme/mallory__x"}
    assert tenancy.hub_writes(parsed(merged="acme/mallory__m"), {"hub_model_id": "acme/mallory__x"}, ns).repos == {
        "args.hub_model_id": "acme/mallory__x", "publish.merged_hub_model_id": "acme/mallory__m"}
    for repo in ("x__y", "acme/x", "acme/mallory__", "acme/mallory__x__y", "other/mallory__x", "x-", "acme/mallory__x..y", "a" * 90):
        with pytest.raises(JobError) as refused:
            tenancy.hub_writes(parsed(), {"hub_model_id": repo}, ns)
        assert refused.value.code == "auth_error" and refused.value.details[0].startswith(f"args.hub_model_id: {repo!r}")
    for user_id in (".x", "a--b", "a..b", "Mallory"):
        with pytest.raises(JobError):
            tenancy.hub_writes(parsed(user_id), {"hub_model_id": "x"}, ns)
    # the job's own token writes where it may; an endpoint with one tenant, as before
    assert tenancy.hub_writes(parsed(hf_token="hf_own"), {"hub_model_id": "bob/x"}, ns).repos == {"args.hub_model_id": "bob/x"}
    single = WorkerSettings.from_env({"HF_TOKEN": OPERATOR_TOKEN})
    assert tenancy.hub_writes(parsed(), {"hub_model_id": "x", "push_dataset_to_hub": "o/d"}, single).repos == {
        "args.hub_model_id": "x", "args.push_dataset_to_hub": "o/d"}
    assert tenancy.TRAINING_HUB_WRITES == ("push_dataset_to_hub", "trackio_space_id")
