"""Token verification: the JWT matrix, key loading and config validation.

Pure and fast: keys are generated once per module with `cryptography`, files
live in `tmp_path`, and token times are set relative to the real clock with
margins far larger than a slow test run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from relay.server.jwt import (
    AUTH_ERROR_REASONS,
    DEFAULT_LEEWAY_S,
    MAX_TOKEN_BYTES,
    AuthConfig,
    AuthError,
    TokenVerifier,
    VerifiedToken,
    mint_token,
)

SECRET = "s" * 32 + "-test-secret"
OTHER_SECRET = "o" * 32 + "-other-secret"
# Distinctive claim values: no error message may ever contain them.
CANARY_SUB = "user-canary-5f0c1d"
CANARY_ORG = "7e0c8a52-3a8f-4d7e-9a43-0f9c1b2d3e4f"
LEEWAY_S = 30


# --- keys and helpers ------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_pem(tmp_path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> Path:
    path = tmp_path / "key.pem"
    path.write_bytes(public_pem(key))
    return path


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str | None, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, **({"kid": kid} if kid is not None else {}), **extra}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str | None, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, **({"kid": kid} if kid is not None else {}), **extra}


def write_jwks(tmp_path: Path, *keys: dict[str, Any]) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": list(keys)}))
    return path


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": CANARY_SUB, "iat": now, "exp": now + 300, "org_id": CANARY_ORG}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def hs256(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """Build a token by hand, for shapes PyJWT refuses to produce."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = b""
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


@pytest.fixture
def hs_verifier() -> TokenVerifier:
    return TokenVerifier(AuthConfig(secret=SECRET, leeway_s=LEEWAY_S))


def assert_rejected(verifier: TokenVerifier, token: Any, reason: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    error = info.value
    assert error.reason == reason
    assert error.reason in AUTH_ERROR_REASONS
    text = f"{error} {error!r} {error.args!r}"
    assert CANARY_SUB not in text
    assert CANARY_ORG not in text
    if isinstance(token, str):
        # Neither the token nor any of its segments shows up.
        for part in [token, *token.split(".")]:
            if len(part) >= 4:
                assert part not in text
    # No PyJWT exception (whose message may quote input) is chained for display.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    return error


# --- the JWT matrix ----------------------------------------------------------


def test_valid_hs256(hs_verifier: TokenVerifier) -> None:
    payload = claims()
    verified = hs_verifier.verify(hs256(payload))
    assert isinstance(verified, VerifiedToken)
    assert verified.claims == payload
    assert verified.subject == CANARY_SUB
    assert verified.expires_at == payload["exp"]
    assert json.loads(verified.claims_json) == payload
    assert " " not in verified.claims_json


def test_subject_may_be_absent(hs_verifier: TokenVerifier) -> None:
    verified = hs_verifier.verify(hs256(claims(sub=_DROP)))
    assert verified.subject is None


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_rejected(hs_verifier: TokenVerifier, alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT"}, claims(), hmac_key=None)
    assert_rejected(hs_verifier, token, "bad_algorithm")


def test_hs256_signed_with_rsa_public_pem_rejected(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = TokenVerifier(AuthConfig(public_key_file=write_pem(tmp_path, rsa_key)))
    assert verifier.allowed_algorithms == {"RS256"}
    token = forge({"alg": "HS256", "typ": "JWT"}, claims(), hmac_key=public_pem(rsa_key))
    assert_rejected(verifier, token, "bad_algorithm")


def test_hs256_signed_with_rsa_public_pem_rejected_when_secret_also_set(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    # HS256 is allowed here, but only ever checked against the configured secret.
    verifier = TokenVerifier(
        AuthConfig(secret=SECRET, public_key_file=write_pem(tmp_path, rsa_key))
    )
    token = forge({"alg": "HS256", "typ": "JWT"}, claims(), hmac_key=public_pem(rsa_key))
    assert_rejected(verifier, token, "bad_signature")


def test_unknown_kid_with_jwks(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    path = write_jwks(tmp_path, rsa_jwk(rsa_key, "rsa-1"), ec_jwk(ec_key, "ec-1"))
    verifier = TokenVerifier(AuthConfig(jwks_file=path))
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-9"})
    assert_rejected(verifier, token, "unknown_kid")
    # Several keys and no kid: ambiguous, so rejected too.
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert_rejected(verifier, token, "unknown_kid")


def test_jwks_selects_key_by_kid(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    path = write_jwks(tmp_path, rsa_jwk(rsa_key, "rsa-1"), ec_jwk(ec_key, "ec-1"))
    verifier = TokenVerifier(AuthConfig(jwks_file=path))
    assert verifier.allowed_algorithms == {"RS256", "ES256"}
    rs = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    es = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    assert verifier.verify(rs).subject == CANARY_SUB
    assert verifier.verify(es).subject == CANARY_SUB
    # An allowed algorithm, but the kid names a key of the other type.
    crossed = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "rsa-1"})
    assert_rejected(verifier, crossed, "bad_algorithm")


def test_jwks_single_key_needs_no_kid(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = TokenVerifier(AuthConfig(jwks_file=write_jwks(tmp_path, ec_jwk(ec_key, "only"))))
    assert verifier.verify(jwt.encode(claims(), ec_key, algorithm="ES256")).subject == CANARY_SUB


@pytest.mark.parametrize("exp", [_DROP, None])
def test_missing_exp(hs_verifier: TokenVerifier, exp: Any) -> None:
    assert_rejected(hs_verifier, hs256(claims(exp=exp)), "missing_exp")


@pytest.mark.parametrize("field", ["exp", "nbf", "iat"])
def test_time_claim_as_string(hs_verifier: TokenVerifier, field: str) -> None:
    # PyJWT alone would accept a numeric string here.
    value = str(int(time.time()) + (300 if field == "exp" else -10))
    assert_rejected(hs_verifier, hs256(claims(**{field: value})), "malformed")


def test_exp_not_a_number(hs_verifier: TokenVerifier) -> None:
    assert_rejected(hs_verifier, hs256(claims(exp="soon")), "malformed")


def test_exp_infinite(hs_verifier: TokenVerifier) -> None:
    assert_rejected(hs_verifier, hs256(claims(exp=float("inf"))), "malformed")


def test_non_finite_claim_cannot_reach_postgres(hs_verifier: TokenVerifier) -> None:
    assert_rejected(hs_verifier, hs256(claims(score=float("nan"))), "malformed")


def test_future_nbf(hs_verifier: TokenVerifier) -> None:
    token = hs256(claims(nbf=int(time.time()) + LEEWAY_S + 120))
    assert_rejected(hs_verifier, token, "not_yet_valid")


def test_nbf_just_inside_leeway_accepted(hs_verifier: TokenVerifier) -> None:
    hs_verifier.verify(hs256(claims(nbf=int(time.time()) + LEEWAY_S - 20)))


def test_future_iat(hs_verifier: TokenVerifier) -> None:
    token = hs256(claims(iat=int(time.time()) + LEEWAY_S + 120))
    assert_rejected(hs_verifier, token, "not_yet_valid")


def test_expired_beyond_leeway(hs_verifier: TokenVerifier) -> None:
    now = int(time.time())
    token = hs256(claims(iat=now - 600, exp=now - LEEWAY_S - 60))
    assert_rejected(hs_verifier, token, "expired")


def test_expired_just_inside_leeway_accepted(hs_verifier: TokenVerifier) -> None:
    now = int(time.time())
    payload = claims(iat=now - 600, exp=now - LEEWAY_S + 20)
    assert hs_verifier.verify(hs256(payload)).expires_at == payload["exp"]


def test_zero_leeway_rejects_just_expired() -> None:
    verifier = TokenVerifier(AuthConfig(secret=SECRET, leeway_s=0))
    assert_rejected(verifier, hs256(claims(exp=int(time.time()) - 5)), "expired")


def test_audience() -> None:
    verifier = TokenVerifier(AuthConfig(secret=SECRET, audience="pgrelay"))
    assert verifier.verify(hs256(claims(aud="pgrelay"))).subject == CANARY_SUB
    assert verifier.verify(hs256(claims(aud=["other", "pgrelay"]))).subject == CANARY_SUB
    assert_rejected(verifier, hs256(claims(aud="other-audience")), "bad_audience")
    assert_rejected(verifier, hs256(claims()), "bad_audience")


def test_audience_not_checked_when_not_configured(hs_verifier: TokenVerifier) -> None:
    assert hs_verifier.verify(hs256(claims(aud="authenticated"))).subject == CANARY_SUB


def test_issuer() -> None:
    verifier = TokenVerifier(AuthConfig(secret=SECRET, issuer="https://idp.example"))
    assert verifier.verify(hs256(claims(iss="https://idp.example"))).subject == CANARY_SUB
    assert_rejected(verifier, hs256(claims(iss="https://evil.example")), "bad_issuer")
    assert_rejected(verifier, hs256(claims()), "bad_issuer")


def test_16kb_token_rejected_before_decoding(hs_verifier: TokenVerifier) -> None:
    # Validly signed: the size alone rejects it.
    token = hs256(claims(padding="x" * 16 * 1024))
    assert len(token) > MAX_TOKEN_BYTES
    assert_rejected(hs_verifier, token, "too_large")
    assert_rejected(hs_verifier, "x" * (16 * 1024), "too_large")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c",
        "...",
        "not base64!.e30.sig",
        "Bearer x.y.z",
        "eyJhbGciOiJIUzI1NiJ9",
        b64url(b"[1,2]") + ".e30.",
        b64url(b"not json") + ".e30.",
        "é.é.é",
    ],
)
def test_garbage_strings(hs_verifier: TokenVerifier, token: str) -> None:
    assert_rejected(hs_verifier, token, "malformed")


@pytest.mark.parametrize("token", [None, b"a.b.c", 42])
def test_non_string_token(hs_verifier: TokenVerifier, token: Any) -> None:
    assert_rejected(hs_verifier, token, "malformed")


def test_signed_payload_that_is_not_a_json_object(hs_verifier: TokenVerifier) -> None:
    token = jwt.api_jws.encode(b"[1,2,3]", SECRET, algorithm="HS256")
    assert_rejected(hs_verifier, token, "malformed")


def test_bad_signatures(hs_verifier: TokenVerifier) -> None:
    assert_rejected(hs_verifier, hs256(claims(), secret=OTHER_SECRET), "bad_signature")
    header, _, signature = hs256(claims()).split(".")
    tampered_payload = b64url(json.dumps(claims(sub="admin")).encode())
    assert_rejected(hs_verifier, f"{header}.{tampered_payload}.{signature}", "bad_signature")


def test_rs256_good_path(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(AuthConfig(public_key_file=write_pem(tmp_path, rsa_key)))
    payload = claims()
    verified = verifier.verify(jwt.encode(payload, rsa_key, algorithm="RS256"))
    assert verified.claims == payload


def test_rs256_other_key_rejected(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = TokenVerifier(AuthConfig(public_key_file=write_pem(tmp_path, rsa_key)))
    token = jwt.encode(claims(), other_rsa_key, algorithm="RS256")
    assert_rejected(verifier, token, "bad_signature")


def test_es256_good_path(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = TokenVerifier(AuthConfig(public_key_file=write_pem(tmp_path, ec_key)))
    assert verifier.allowed_algorithms == {"ES256"}
    payload = claims()
    assert verifier.verify(jwt.encode(payload, ec_key, algorithm="ES256")).claims == payload
    assert_rejected(verifier, hs256(payload), "bad_algorithm")


def test_configured_algorithm_outside_the_list_rejected(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = TokenVerifier(
        AuthConfig(public_key_file=write_pem(tmp_path, rsa_key), algorithms="RS256, PS256")
    )
    assert verifier.verify(jwt.encode(claims(), rsa_key, algorithm="PS256"))
    assert_rejected(verifier, jwt.encode(claims(), rsa_key, algorithm="RS512"), "bad_algorithm")


# --- mint_token ----------------------------------------------------------------


def test_mint_token_round_trip() -> None:
    verifier = TokenVerifier(
        AuthConfig(secret=SECRET, audience="pgrelay", issuer="pgrelay-cli", leeway_s=0)
    )
    token = mint_token(
        SECRET,
        orgs=[CANARY_ORG.upper()],
        sub=CANARY_SUB,
        lifetime_s=120,
        audience="pgrelay",
        issuer="pgrelay-cli",
    )
    verified = verifier.verify(token)
    assert verified.subject == CANARY_SUB
    assert verified.claims["org_id"] == CANARY_ORG
    assert "org_ids" not in verified.claims
    assert verified.expires_at - verified.claims["iat"] == 120


def test_mint_token_several_orgs_and_explicit_now(hs_verifier: TokenVerifier) -> None:
    orgs = [str(uuid.uuid4()), str(uuid.uuid4())]
    now = int(time.time())
    token = mint_token(SECRET, orgs=orgs, sub=None, lifetime_s=60, now=now)
    verified = hs_verifier.verify(token)
    assert verified.claims == {"iat": now, "exp": now + 60, "org_ids": orgs}
    assert verified.subject is None
    expired = mint_token(SECRET, orgs=None, sub="u", lifetime_s=60, now=now - 600)
    assert_rejected(hs_verifier, expired, "expired")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"secret": "short"}, "PGRELAY_JWT_SECRET is shorter than 32 bytes"),
        ({"orgs": ["not-a-uuid"]}, "not a uuid"),
        ({"lifetime_s": 0}, "lifetime_s"),
    ],
)
def test_mint_token_refuses_bad_input(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"secret": SECRET, "orgs": None, "sub": "u", "lifetime_s": 60}
    args.update(kwargs)
    secret = args.pop("secret")
    with pytest.raises(ValueError, match=message):
        mint_token(secret, **args)


# --- configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no JWT verification key is configured"),
        ({"secret": ""}, "PGRELAY_JWT_SECRET is shorter than 32 bytes"),
        ({"secret": "x" * 31}, "PGRELAY_JWT_SECRET is shorter than 32 bytes"),
        ({"secret": SECRET, "algorithms": ["HS512"]}, "shorter than 64 bytes"),
        ({"secret": SECRET, "algorithms": ["RS256"]}, "PGRELAY_JWT_ALGORITHMS allows RS256"),
        ({"secret": SECRET, "algorithms": ["none"]}, "'none' is not supported"),
        ({"secret": SECRET, "algorithms": []}, "PGRELAY_JWT_ALGORITHMS is empty"),
        ({"public_key_file": "k.pem", "algorithms": "HS256"}, "PGRELAY_JWT_SECRET is not set"),
        (
            {"secret": SECRET, "public_key_file": "k.pem", "algorithms": "RS256"},
            "allows no HS",
        ),
        ({"public_key_file": "k.pem", "jwks_file": "k.json"}, "set only one of"),
        ({"secret": SECRET, "leeway_s": -1}, "PGRELAY_JWT_LEEWAY_S"),
        ({"secret": SECRET, "leeway_s": 3600}, "PGRELAY_JWT_LEEWAY_S"),
        ({"secret": SECRET, "audience": ""}, "PGRELAY_JWT_AUDIENCE"),
        ({"secret": SECRET, "issuer": ""}, "PGRELAY_JWT_ISSUER"),
    ],
)
def test_config_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AuthConfig(**kwargs)


def test_config_defaults_and_repr_hides_secret() -> None:
    config = AuthConfig(secret=SECRET, algorithms=["HS256", "HS256"])
    assert config.algorithms == ("HS256",)
    assert config.leeway_s == DEFAULT_LEEWAY_S
    assert SECRET not in repr(config)


def test_verifier_refuses_pem_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="PGRELAY_JWT_SECRET looks like a PEM"):
        TokenVerifier(AuthConfig(secret=public_pem(rsa_key).decode()))


def test_verifier_refuses_bad_public_key_files(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    def refused(message: str, **kwargs: Any) -> None:
        with pytest.raises(ValueError, match=message):
            TokenVerifier(AuthConfig(**kwargs))

    refused("PGRELAY_JWT_PUBLIC_KEY_FILE: cannot read", public_key_file=tmp_path / "missing.pem")
    private = tmp_path / "private.pem"
    private.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    refused("holds a private key", public_key_file=private)
    weak = tmp_path / "weak.pem"
    weak.write_bytes(public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    refused("1024-bit RSA key", public_key_file=weak)
    rsa_pem = write_pem(tmp_path, rsa_key)
    refused(
        "allows ES256 but PGRELAY_JWT_PUBLIC_KEY_FILE", public_key_file=rsa_pem, algorithms="ES256"
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    refused("not a PEM public key", public_key_file=garbage)


def test_verifier_refuses_bad_jwks(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    def refused(message: str, *keys: dict[str, Any]) -> None:
        with pytest.raises(ValueError, match=message):
            TokenVerifier(AuthConfig(jwks_file=write_jwks(tmp_path, *keys)))

    oct_key = {"kty": "oct", "k": b64url(SECRET.encode()), "kid": "h"}
    refused("symmetric key", oct_key)
    refused("holds a private key", {**rsa_jwk(rsa_key, "r"), "d": "AQAB"})
    refused("kid 'a' appears twice", rsa_jwk(rsa_key, "a"), ec_jwk(ec_key, "a"))
    refused("every key needs a kid", rsa_jwk(rsa_key, "a"), ec_jwk(ec_key, None))
    refused("is not a usable public key", rsa_jwk(rsa_key, "a", alg="ES256"))
    refused("does not fit the key type", ec_jwk(ec_key, "a", alg="ES384"))
    refused("no signature keys", rsa_jwk(rsa_key, "a", use="enc"))
    refused("no signature keys")


def test_jwks_alg_binds_the_key(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    path = write_jwks(tmp_path, rsa_jwk(rsa_key, "a", alg="PS256"), rsa_jwk(other_rsa_key, "b"))
    verifier = TokenVerifier(AuthConfig(jwks_file=path))
    assert verifier.allowed_algorithms == {"PS256", "RS256"}
    good = jwt.encode(claims(), rsa_key, algorithm="PS256", headers={"kid": "a"})
    assert verifier.verify(good).subject == CANARY_SUB
    other = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "a"})
    assert_rejected(verifier, other, "bad_algorithm")


def test_auth_error_reasons_are_closed() -> None:
    with pytest.raises(ValueError):
        AuthError("nope")  # type: ignore[arg-type]


def test_a_verified_token_is_remembered_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.server.jwt as module

    verifier = TokenVerifier(AuthConfig(secret=SECRET, leeway_s=0))
    token = mint_token(SECRET, orgs=None, sub="u1", lifetime_s=60)
    first = verifier.verify(token)
    calls: list[str] = []
    real = jwt.decode
    monkeypatch.setattr(
        module.jwt, "decode", lambda *a, **k: calls.append("decode") or real(*a, **k)
    )
    assert verifier.verify(token) == first and calls == []  # no second verification
    # Another token with the same claims but a forged signature is not "the same".
    head, body, _ = token.split(".")
    with pytest.raises(AuthError) as forged:
        verifier.verify(f"{head}.{body}.{base64.urlsafe_b64encode(b'x' * 32).decode().rstrip('=')}")
    assert forged.value.reason == "bad_signature"
    later = time.time() + 61
    monkeypatch.setattr(module.time, "time", lambda: later)
    with pytest.raises(AuthError) as expired:
        verifier.verify(token)
    assert expired.value.reason == "expired"


def test_the_cache_of_verified_tokens_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.server.jwt as module

    monkeypatch.setattr(module, "VERIFIED_CACHE_SIZE", 10)
    verifier = TokenVerifier(AuthConfig(secret=SECRET))
    for i in range(25):
        verifier.verify(mint_token(SECRET, orgs=None, sub=f"u{i}"))
    assert len(verifier._verified) == 10
