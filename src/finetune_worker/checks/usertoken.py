"""Who the user is: the operator's optional signed token for a job's user_id.

RunPod authenticates the caller, not the user: anyone holding the endpoint's API
key may submit any job, and `user_id` is only the namespace the caller names. An
operator who puts the endpoint behind a service of its own, for many customers,
sets FINETUNE_USER_TOKEN_SECRET (HMAC: HS256, and HS384/HS512 for a secret of
48/64 bytes or more) and/or
FINETUNE_USER_TOKEN_PUBLIC_KEY (PEM: RS*/PS* for an RSA key, ES* for its EC curve,
EdDSA for Ed25519/Ed448). Every job must then carry `credentials.user_token`, a JWT
signed by that service whose `sub` is the job's user_id and which has an `exp`
(with FINETUNE_USER_TOKEN_MAX_LIFETIME_S, also an `iat`, at most that long before `exp`).

The check reads the raw request and runs first, before the input is validated,
before the run lock and before any child process. Each key only ever verifies its
own family of algorithms (never `none`, never an HMAC secret against an RS token),
and no message repeats the token or its claims.
"""

from __future__ import annotations

from typing import Any

from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import WorkerSettings

# RFC 7518 3.2: an HMAC key at least as long as its hash. A secret verifies only the
# algorithms it is long enough for (and at least HS256).
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
MIN_SECRET_BYTES = HMAC_MIN_BYTES["HS256"]
MAX_TOKEN_CHARS = 16 * 1024
LEEWAY_SECONDS = 30  # clock skew between the operator's service and the worker

MISSING = "this endpoint requires credentials.user_token, a token signed by the operator's service for this user_id"


class Misconfigured(Exception):
    """The operator's key cannot be used; no job can be authenticated."""


def check_user_token(raw: Any, settings: WorkerSettings) -> str | None:
    """Raise an `auth_error` JobError unless the job carries a valid token for its user_id.

    Returns a warning when a token was sent to an endpoint that checks none."""
    token = _raw_token(raw)
    if not settings.user_tokens_required:
        if token is not None:
            return "credentials.user_token was ignored: this endpoint does not check user tokens"
        return None
    try:
        keys = verification_keys(settings)
    except Misconfigured as exc:
        raise JobError(errors.AUTH_ERROR, f"this endpoint's user-token check is misconfigured ({exc}); the operator must fix it") from None
    if token is None:
        raise _refused(MISSING)
    if not isinstance(token, str) or not token.strip():
        raise _refused("credentials.user_token must be a non-empty string: a JWT signed by the operator's service")
    if len(token) > MAX_TOKEN_CHARS:
        raise _refused(f"credentials.user_token is longer than {MAX_TOKEN_CHARS} characters; it is not a token from the operator's service")
    claims = _verify(token.strip(), keys, settings)
    user_id = raw.get("user_id")
    if claims.get("sub") != user_id:
        raise _refused("credentials.user_token was not issued for this user_id (its subject differs)")
    return None


def verification_keys(settings: WorkerSettings) -> list[tuple[Any, tuple[str, ...]]]:
    """(key, the algorithms that key may verify) for each configured key."""
    import jwt

    keys: list[tuple[Any, tuple[str, ...]]] = []
    if settings.user_token_secret is not None:
        secret = settings.user_token_secret.get_secret_value().encode()
        if len(secret) < MIN_SECRET_BYTES:
            raise Misconfigured(f"FINETUNE_USER_TOKEN_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        try:
            jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256).prepare_key(secret)
        except jwt.exceptions.InvalidKeyError:  # PyJWT refuses key-shaped HMAC secrets (algorithm confusion)
            raise Misconfigured("FINETUNE_USER_TOKEN_SECRET looks like a key (PEM, DER, SSH or JWK), not an HMAC secret; "
                                "a public key goes in FINETUNE_USER_TOKEN_PUBLIC_KEY") from None
        keys.append((secret, tuple(alg for alg, size in HMAC_MIN_BYTES.items() if len(secret) >= size)))
    if settings.user_token_public_key is not None:
        keys.append(_public_key(settings.user_token_public_key))
    return keys


def _public_key(pem: str) -> tuple[Any, tuple[str, ...]]:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    text = pem.strip().replace("\\n", "\n")  # a one-line environment variable
    if "PRIVATE KEY" in text:
        raise Misconfigured("FINETUNE_USER_TOKEN_PUBLIC_KEY holds a private key; give the worker only the public key")
    try:
        if "BEGIN CERTIFICATE" in text:
            key = x509.load_pem_x509_certificate(text.encode()).public_key()
        else:
            key = load_pem_public_key(text.encode())
    except ValueError:
        raise Misconfigured("FINETUNE_USER_TOKEN_PUBLIC_KEY is not a PEM public key or certificate") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return key, ("EdDSA",)
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512", "secp256k1": "ES256K"}
        if key.curve.name in by_curve:
            return key, (by_curve[key.curve.name],)
    raise Misconfigured("FINETUNE_USER_TOKEN_PUBLIC_KEY is not an RSA, EC (P-256, P-384, P-521, secp256k1) or Ed25519/Ed448 key")


def _verify(token: str, keys: list[tuple[Any, tuple[str, ...]]], settings: WorkerSettings) -> dict:
    import jwt

    accepted = [alg for _, algorithms in keys for alg in algorithms]
    try:
        alg = jwt.get_unverified_header(token).get("alg")
    except jwt.exceptions.InvalidTokenError:
        raise _refused("credentials.user_token is not a well-formed JWT") from None
    # The token's header only picks which configured key to try; each key verifies
    # nothing but its own, fixed family of algorithms.
    chosen = next(((key, algorithms) for key, algorithms in keys if alg in algorithms), None)
    if chosen is None:
        raise _refused(f"credentials.user_token is signed with an algorithm this endpoint does not accept (it accepts {', '.join(accepted)})")
    key, algorithms = chosen
    require = ["exp", "sub"]
    audience, issuer = settings.user_token_audience, settings.user_token_issuer
    require += ["aud"] if audience else []
    require += ["iss"] if issuer else []
    max_lifetime = settings.user_token_max_lifetime_s
    require += ["iat"] if max_lifetime else []
    try:
        claims = jwt.decode(
            token, key, algorithms=list(algorithms), options={"require": require},
            audience=audience, issuer=issuer, leeway=LEEWAY_SECONDS,
        )
    except jwt.exceptions.ExpiredSignatureError:
        raise _refused("credentials.user_token has expired; ask the operator's service for a new one") from None
    except jwt.exceptions.InvalidSignatureError:
        raise _refused("credentials.user_token has a bad signature: it was not signed with this endpoint's key") from None
    except jwt.exceptions.MissingRequiredClaimError as exc:
        raise _refused(f"credentials.user_token has no '{exc.claim}' claim; it needs {', '.join(require)}") from None
    except jwt.exceptions.ImmatureSignatureError:
        raise _refused("credentials.user_token is not valid yet (nbf or iat is in the future)") from None
    except jwt.exceptions.InvalidAudienceError:
        raise _refused("credentials.user_token is not meant for this endpoint (its audience differs)") from None
    except jwt.exceptions.InvalidIssuerError:
        raise _refused("credentials.user_token was not issued by the operator's service (its issuer differs)") from None
    except jwt.exceptions.InvalidSubjectError:
        raise _refused("credentials.user_token's subject must be a string: the job's user_id") from None
    except jwt.exceptions.PyJWTError:
        raise _refused("credentials.user_token is not a valid token from the operator's service") from None
    if max_lifetime and int(claims["exp"]) - int(claims["iat"]) > max_lifetime:  # both read as PyJWT read them
        raise _refused(f"credentials.user_token is valid for longer than this endpoint allows ({max_lifetime:g} s from iat to exp, "
                       "FINETUNE_USER_TOKEN_MAX_LIFETIME_S); ask the operator's service for a shorter-lived token")
    return claims


def _raw_token(raw: Any) -> Any:
    """The token as sent (None when absent), read from the raw request before any parsing."""
    if not isinstance(raw, dict) or not isinstance(raw.get("credentials"), dict):
        return None
    return raw["credentials"].get("user_token")


def _refused(message: str) -> JobError:
    return JobError(errors.AUTH_ERROR, message)
