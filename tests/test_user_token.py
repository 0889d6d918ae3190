"""The operator's optional user tokens: who the user is, checked before anything else.

A job that gets past the check is sent with `args: []`, so it stops at parsing
(`invalid_input`) without importing Axolotl or starting a child: that it got there,
and not `auth_error`, shows the token was accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conftest import collect, make_job, training_pids
from finetune_worker import pipeline
from finetune_worker.checks.usertoken import MISSING
from finetune_worker.checks.validation import ValidJob
from finetune_worker.contract.job import JobInput
from finetune_worker.host import redact
from finetune_worker.host.children import ChildProcess
from finetune_worker.host.redact import Redactor, secrets_in_raw_input
from finetune_worker.host.rundir import run_paths

SECRET = "operator-secret-0123456789-abcdefghijklmnop"  # 43 bytes
LONG_SECRET = "operator-secret-" + "0123456789abcdef" * 3  # 64 bytes: HS256, HS384 and HS512
OTHER_SECRET = "someone-else-0123456789-abcdefghijklmnopqrs"
NOT_PAST_PARSING = []  # `args` must be an object: a job that passes the check stops at parsing


def mint(sub: str, key=SECRET, alg: str = "HS256", exp_in: float | None = 600, **claims) -> str:
    payload = {"sub": sub, **claims}
    if exp_in is not None:
        payload["exp"] = int(time.time() + exp_in)
    return jwt.encode(payload, key, algorithm=alg)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_signed_with(key: bytes, sub: str) -> str:
    """An HS256 token whose HMAC key is `key` (PyJWT refuses to make one with a PEM key)."""
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps({'sub': sub, 'exp': int(time.time()) + 600}).encode())}"
    return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"


def pem_public(private_key) -> str:
    return private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """Records each step a job must not reach without a valid token (and lets it run)."""
    seen: list[str] = []

    def spy(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            seen.append(label)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    spy(pipeline, "parse_job_input", "parse")
    spy(pipeline, "validate_job", "validate")
    spy(pipeline, "take_run", "lock")
    spy(ChildProcess, "start", "child")
    return seen


def runs_of(volume, user: str):
    return volume / "runs" / user


def assert_refused(evs: list[dict], token: str | None, calls: list[str], volume, user: str, job: dict, needle: str) -> None:
    last = evs[-1]
    assert last["type"] == "error" and last["code"] == "auth_error", last
    assert needle in last["message"], last["message"]
    assert calls == [], f"the job got past the token check: {calls}"
    assert not runs_of(volume, user).exists()
    assert training_pids(job["run_id"]) == []
    if token:
        assert token not in json.dumps(evs)
    assert [e["type"] for e in evs] == ["status", "error"]


def assert_accepted(evs: list[dict], token: str | None, calls: list[str]) -> None:
    last = evs[-1]
    assert last["code"] == "invalid_input" and last["details"] == ["args: Input should be a valid dictionary"], last
    assert calls == ["parse"]  # past the token check; the request's own problem ends it before Axolotl's check (fail fast)
    if token:
        assert token not in json.dumps(evs)


# -- no key on the endpoint: jobs run as today --------------------------------------


def test_without_a_key_jobs_need_no_token(env, user, calls):
    evs = collect(make_job(NOT_PAST_PARSING, user_id=user), env)
    assert_accepted(evs, None, calls)
    assert not any(e["type"] == "warning" for e in evs)


def test_without_a_key_a_token_is_ignored_with_a_warning(env, user, calls):
    token = mint(user)
    evs = collect(make_job(NOT_PAST_PARSING, user_id=user, credentials={"user_token": token}), env)
    assert_accepted(evs, token, calls)
    assert "credentials.user_token was ignored" in evs[1]["message"]


# -- a secret on the endpoint: only a valid token for this user_id gets in -------------


@pytest.fixture
def hs_env(env):
    return {**env, "FINETUNE_USER_TOKEN_SECRET": SECRET}


def test_a_valid_token_gets_past_the_check(hs_env, user, calls):
    token = mint(user)
    evs = collect(make_job(NOT_PAST_PARSING, user_id=user, credentials={"user_token": token}), hs_env)
    assert_accepted(evs, token, calls)


def test_hs384_and_hs512_need_a_secret_long_enough_for_them(hs_env, volume, user, calls):
    long_env = {**hs_env, "FINETUNE_USER_TOKEN_SECRET": LONG_SECRET}
    for alg in ("HS256", "HS384", "HS512"):
        calls.clear()
        token = mint(user, key=LONG_SECRET, alg=alg)
        assert_accepted(collect(make_job(NOT_PAST_PARSING, user_id=user, credentials={"user_token": token}), long_env), token, calls)
    calls.clear()
    job = make_job({"base_model": "x/y"}, user_id=user, credentials={"user_token": mint(user, key=LONG_SECRET, alg="HS512")})
    assert_refused(collect(job, {**hs_env, "FINETUNE_USER_TOKEN_SECRET": LONG_SECRET[:43]}), None, calls, volume, user, job, "accepts HS256)")


REFUSALS = {
    "missing": (lambda user: None, MISSING),
    "expired": (lambda user: mint(user, exp_in=-3600), "has expired"),
    "no expiry": (lambda user: mint(user, exp_in=None), "has no 'exp' claim"),
    "no subject": (lambda user: jwt.encode({"exp": int(time.time()) + 600}, SECRET, "HS256"), "has no 'sub' claim"),
    "another user": (lambda user: mint("someone-else"), "not issued for this user_id"),
    "wrong key": (lambda user: mint(user, key=OTHER_SECRET), "bad signature"),
    "alg none": (lambda user: mint(user, key=None, alg="none"), "algorithm this endpoint does not accept"),
    "not yet valid": (lambda user: mint(user, nbf=int(time.time()) + 3600), "not valid yet"),
    "not a jwt": (lambda user: "not-a-token-at-all", "not a well-formed JWT"),
    "tampered": (lambda user: _tamper(mint(user), {"sub": user, "exp": int(time.time()) + 600, "admin": True}), "bad signature"),
    "empty": (lambda user: "", "must be a non-empty string"),
    "huge": (lambda user: "x" * 20000, "longer than"),
}


def _tamper(token: str, payload: dict) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{b64(json.dumps(payload).encode())}.{signature}"


@pytest.mark.parametrize("case", REFUSALS)
def test_no_valid_token_no_job(hs_env, volume, user, calls, case):
    make_token, needle = REFUSALS[case]
    token = make_token(user)
    credentials = {} if token is None else {"user_token": token}
    job = make_job({"base_model": "x/y", "learning_rate": 0.001}, user_id=user, credentials=credentials)
    evs = collect(job, hs_env)
    assert_refused(evs, token if token and len(token) > 6 else None, calls, volume, user, job, needle)


def test_a_token_of_the_wrong_type_is_refused(hs_env, volume, user, calls):
    job = make_job({"base_model": "x/y"}, user_id=user, credentials={"user_token": 12345})
    assert_refused(collect(job, hs_env), None, calls, volume, user, job, "must be a non-empty string")


def test_malformed_input_is_refused_before_it_is_parsed(hs_env, volume, user, calls):
    """An unauthenticated caller learns nothing about the input's shape."""
    job = make_job({"base_model": "x/y"}, user_id=user, run_id="../escape", credential={"hf_token": "x"})
    evs = collect(job, hs_env)
    assert evs[-1]["code"] == "auth_error" and evs[-1]["details"] == [] and calls == []


def test_a_token_for_another_user_reveals_nothing_about_that_users_runs(hs_env, volume, user, calls):
    paths = run_paths(volume / "runs", user, "done")
    paths.run_dir.mkdir(parents=True)
    paths.result_file.write_text(json.dumps({"type": "result", "status": "completed", "run_id": "done", "output_dir": "secret-place"}))
    token = mint("intruder")
    evs = collect(make_job({"base_model": "x/y"}, user_id=user, run_id="done", credentials={"user_token": token}), hs_env)
    assert evs[-1]["code"] == "auth_error" and calls == []
    text = json.dumps(evs)
    assert "secret-place" not in text and "completed" not in text and "done" not in text


# -- public keys (RS*, PS*, ES*, EdDSA) and algorithm confusion ----------------------------


def test_rsa_public_key_accepts_rs_and_ps_tokens(env, rsa_key, user, calls):
    pk_env = {**env, "FINETUNE_USER_TOKEN_PUBLIC_KEY": pem_public(rsa_key)}
    for alg in ("RS256", "PS256"):
        calls.clear()
        token = mint(user, key=rsa_key, alg=alg)
        assert_accepted(collect(make_job(NOT_PAST_PARSING, user_id=user, credentials={"user_token": token}), pk_env), token, calls)


@pytest.mark.parametrize("make_key,alg", [(lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"), (ed25519.Ed25519PrivateKey.generate, "EdDSA")])
def test_ec_and_ed25519_public_keys(env, user, calls, make_key, alg):
    key = make_key()
    pk_env = {**env, "FINETUNE_USER_TOKEN_PUBLIC_KEY": pem_public(key).replace("\n", "\\n")}  # a one-line variable works too
    token = mint(user, key=key, alg=alg)
    assert_accepted(collect(make_job(NOT_PAST_PARSING, user_id=user, credentials={"user_token": token}), pk_env), token, calls)


def test_a_token_signed_by_another_rsa_key_is_refused(env, rsa_key, volume, user, calls):
    pk_env = {**env, "FINETUNE_USER_TOKEN_PUBLIC_KEY": pem_public(rsa_key)}
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = mint(user, key=other, alg="RS256")
    job = make_job({"base_model": "x/y"}, user_id=user, credentials={"user_token": token})
    assert_refused(collect(job, pk_env), token, calls, volume, user, job, "bad signature")


def test_the_public_key_never_verifies_an_hmac_token(env, rsa_key, volume, user, calls):
    """Algorithm confusion: an HS256 token keyed with the (public) PEM is refused."""
    public = pem_public(rsa_key)
    token = hs256_signed_with(public.encode(), user)
    job = make_job({"base_model": "x/y"}, user_id=user, credentials={"user_token": token})
    assert_refused(collect(job, {**env, "FINETUNE_USER_TOKEN_PUBLIC_KEY": public}), token, calls, volume, user, job, "does not accept")
    # with both keys set, HS256 goes to the secret alone: the same token has a bad signature
    both = {**env, "FINETUNE_USER_TOKEN_PUBLIC_KEY": public, "FINETUNE_USER_TOKEN_SECRET": SECRET}
    assert_refused(collect(job, both), token, calls, volume, user, job, "bad signature")


def test_with_both_keys_either_kind_of_token_is_accepted(env, rsa_key, user, calls):
    both = {**env, "FINETUNE_USER_TOKEN_PUBLIC_KEY": pem_public(rsa_key), "FINETUNE_USER_TOKEN_SECRET": SECRET}
    for token in (mint(user), mint(user, key=rsa_key, alg="RS256")):
        calls.clear()
        assert_accepted(collect(make_job(NOT_PAST_PARSING, user_id=user, credentials={"user_token": token}), both), token, calls)


# -- the operator's configuration --------------------------------------------------------------


@pytest.mark.parametrize("extra,needle", [
    ({"FINETUNE_USER_TOKEN_SECRET": "short"}, "at least 32 bytes"),
    ({"FINETUNE_USER_TOKEN_PUBLIC_KEY": "not a key"}, "not a PEM public key"),
    ({"FINETUNE_USER_TOKEN_PUBLIC_KEY": "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----"}, "holds a private key"),
])
def test_a_misconfigured_key_refuses_every_job(env, volume, user, calls, extra, needle):
    job = make_job({"base_model": "x/y"}, user_id=user, credentials={"user_token": mint(user)})
    evs = collect(job, {**env, **extra})
    assert evs[-1]["code"] == "auth_error" and "misconfigured" in evs[-1]["message"] and needle in evs[-1]["message"]
    assert calls == [] and not runs_of(volume, user).exists()


def test_a_public_key_as_the_hmac_secret_is_refused(env, rsa_key, user, calls):
    evs = collect(make_job({"base_model": "x/y"}, user_id=user), {**env, "FINETUNE_USER_TOKEN_SECRET": pem_public(rsa_key)})
    assert evs[-1]["code"] == "auth_error" and "looks like a key" in evs[-1]["message"] and calls == []


def test_audience_and_issuer_when_the_operator_sets_them(hs_env, volume, user, calls):
    checked = {**hs_env, "FINETUNE_USER_TOKEN_AUDIENCE": "finetune", "FINETUNE_USER_TOKEN_ISSUER": "https://operator.example"}
    good = mint(user, aud="finetune", iss="https://operator.example")
    assert_accepted(collect(make_job(NOT_PAST_PARSING, user_id=user, credentials={"user_token": good}), checked), good, calls)
    for token, needle in [
        (mint(user, iss="https://operator.example"), "has no 'aud' claim"),
        (mint(user, aud="another-service", iss="https://operator.example"), "audience differs"),
        (mint(user, aud="finetune", iss="https://elsewhere.example"), "issuer differs"),
    ]:
        calls.clear()
        job = make_job({"base_model": "x/y"}, user_id=user, credentials={"user_token": token})
        assert_refused(collect(job, checked), token, calls, volume, user, job, needle)


def test_the_operator_caps_a_tokens_lifetime(hs_env, volume, user, calls):
    """FINETUNE_USER_TOKEN_MAX_LIFETIME_S: a token minted for a year (or without iat) is refused."""
    capped = {**hs_env, "FINETUNE_USER_TOKEN_MAX_LIFETIME_S": "3600"}
    now = int(time.time())
    good = mint(user, exp_in=600, iat=now)
    assert_accepted(collect(make_job(NOT_PAST_PARSING, user_id=user, credentials={"user_token": good}), capped), good, calls)
    for token, needle in [
        (mint(user, exp_in=365 * 86400, iat=now), "valid for longer than this endpoint allows (3600 s"),
        (mint(user, exp_in=600, iat=now - 7200), "valid for longer than this endpoint allows"),
        (mint(user, exp_in=600), "has no 'iat' claim"),
    ]:
        calls.clear()
        job = make_job({"base_model": "x/y"}, user_id=user, credentials={"user_token": token})
        assert_refused(collect(job, capped), token, calls, volume, user, job, needle)
    calls.clear()  # without the setting, a long-lived token is still accepted (as before)
    long_lived = mint(user, exp_in=365 * 86400, iat=now)
    assert_accepted(collect(make_job(NOT_PAST_PARSING, user_id=user, credentials={"user_token": long_lived}), hs_env), long_lived, calls)


# -- the token is a secret: redacted, never stored ----------------------------------------


def test_the_token_is_redacted_and_jwt_shapes_are_masked():
    token = mint("alice")
    assert token in secrets_in_raw_input({"credentials": {"user_token": token}})
    assert token not in Redactor([token]).text(f"got {token}")
    assert token not in Redactor().text(f"Authorization: {token} (unknown to the redactor)")
    assert "FINETUNE_USER_TOKEN_SECRET" in redact.SECRET_ENV_VARS
    assert SECRET not in Redactor(redact.secrets_in_env({"FINETUNE_USER_TOKEN_SECRET": SECRET})).text(f"key={SECRET}")


def test_the_job_record_says_a_token_was_given_without_storing_it():
    token = mint("alice")
    job = JobInput.model_validate({"user_id": "alice", "model_id": "m", "run_id": "r", "args": {}, "credentials": {"user_token": token}})
    assert token not in repr(job) and token not in job.model_dump_json()
    record = ValidJob(job=job, args={}).record()
    assert record["credentials_given"] == {"hf_token": False, "wandb_api_key": False, "comet_api_key": False, "swanlab_api_key": False,
                                           "s3_access_key_id": False, "s3_secret_access_key": False, "s3_session_token": False,
                                           "user_token": True}
    assert token not in json.dumps(record)


# -- restart and continue_from cannot act on another user's runs -------------------------------


@pytest.mark.parametrize("fields", [{"restart": True}, {"continue_from": {"run_id": "earlier"}}])
def test_a_token_for_another_user_cannot_restart_or_continue_that_users_runs(hs_env, volume, user, calls, fields):
    """The victim's run is made by hand (no training); mallory's token names mallory."""
    for run_id in ("target", "earlier"):
        paths = run_paths(volume / "runs", user, run_id)
        (paths.run_dir / "output").mkdir(parents=True)
        paths.result_file.write_text(json.dumps({"type": "result", "status": "completed", "run_id": run_id}))
    before = sorted(p.name for p in runs_of(volume, user).iterdir())
    token = mint("mallory")
    job = make_job({"base_model": "x/y"}, user_id=user, run_id="target", credentials={"user_token": token}, **fields)
    evs = collect(job, hs_env)
    assert evs[-1]["code"] == "auth_error" and calls == [], evs[-1]
    after = sorted(p.name for p in runs_of(volume, user).iterdir())
    assert after == before and not [name for name in after if ".previous-" in name]
    assert run_paths(volume / "runs", user, "target").result_file.exists()
    assert token not in json.dumps(evs)
