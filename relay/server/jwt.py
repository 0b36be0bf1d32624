"""Verify the JWTs that clients present, and mint tokens for `pgrelay token`.

The verifier accepts a token only under keys and algorithms that the operator
configured. The token's own header never widens that choice: an HS* token is
checked only against `PGRELAY_JWT_SECRET`, and an RS*/PS*/ES* token only
against public keys from a PEM file or a JWKS file.

Failures:

    ValueError   -- the configuration is unusable (raised by `AuthConfig` and
                    `TokenVerifier`); the message names the setting.
    AuthError    -- a presented token was rejected; `.reason` is one short
                    word from `AUTH_ERROR_REASONS`. Neither the message nor
                    the exception chain holds token text or claim values, so
                    logging the error does not leak the token.

All JWT work is done by PyJWT. This module only picks the key, states which
algorithms are allowed, and adds the checks PyJWT leaves out (token size,
numeric time claims, JSON that Postgres can store).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm

if TYPE_CHECKING:
    from jwt.types import Options

__all__ = [
    "AUTH_ERROR_REASONS",
    "DEFAULT_LEEWAY_S",
    "DEFAULT_TOKEN_LIFETIME_S",
    "MAX_LEEWAY_S",
    "MAX_TOKEN_BYTES",
    "SUPPORTED_ALGORITHMS",
    "AuthConfig",
    "AuthError",
    "AuthErrorReason",
    "TokenVerifier",
    "VerifiedToken",
    "mint_token",
]

# Clock skew allowed on exp, nbf and iat. PostgREST allows the same 30 s.
DEFAULT_LEEWAY_S: Final = 30
# A larger leeway stops being clock skew and starts extending every token.
MAX_LEEWAY_S: Final = 300
# Tokens larger than this are rejected before any parsing.
MAX_TOKEN_BYTES: Final = 8 * 1024
# Default lifetime of a token made by `mint_token` for `pgrelay token`.
DEFAULT_TOKEN_LIFETIME_S: Final = 3600
# RSA keys below this size are refused at startup.
MIN_RSA_KEY_BITS: Final = 2048

# RFC 7518 §3.2: an HMAC key is at least as long as the hash output.
HMAC_MIN_SECRET_BYTES: Final[Mapping[str, int]] = {"HS256": 32, "HS384": 48, "HS512": 64}
_RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
# Each ES algorithm is bound to one curve (RFC 7518 §3.4).
_EC_CURVE_BY_ALGORITHM: Final[Mapping[str, type[ec.EllipticCurve]]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
SUPPORTED_ALGORITHMS: Final = frozenset(
    HMAC_MIN_SECRET_BYTES.keys() | _RSA_ALGORITHMS | _EC_CURVE_BY_ALGORITHM.keys()
)

# Names of the settings, as the operator sees them (environment variables).
SECRET_SETTING: Final = "PGRELAY_JWT_SECRET"
PUBLIC_KEY_FILE_SETTING: Final = "PGRELAY_JWT_PUBLIC_KEY_FILE"
JWKS_FILE_SETTING: Final = "PGRELAY_JWT_JWKS_FILE"
ALGORITHMS_SETTING: Final = "PGRELAY_JWT_ALGORITHMS"
AUDIENCE_SETTING: Final = "PGRELAY_JWT_AUDIENCE"
ISSUER_SETTING: Final = "PGRELAY_JWT_ISSUER"
LEEWAY_SETTING: Final = "PGRELAY_JWT_LEEWAY_S"

AuthErrorReason = Literal[
    "too_large",
    "malformed",
    "bad_algorithm",
    "unknown_kid",
    "bad_signature",
    "missing_exp",
    "expired",
    "not_yet_valid",
    "bad_audience",
    "bad_issuer",
]
AUTH_ERROR_REASONS: Final[frozenset[str]] = frozenset(get_args(AuthErrorReason))

_REASON_TEXT: Final[Mapping[str, str]] = {
    "too_large": "token is larger than the size limit",
    "malformed": "token is not a well-formed JWT",
    "bad_algorithm": "token algorithm is not allowed for the configured keys",
    "unknown_kid": "token key id matches no configured key",
    "bad_signature": "token signature does not verify",
    "missing_exp": "token has no exp claim",
    "expired": "token has expired",
    "not_yet_valid": "token is not valid yet",
    "bad_audience": "token audience is not accepted",
    "bad_issuer": "token issuer is not accepted",
}

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class AuthError(Exception):
    """A presented token was rejected.

    `reason` is a short machine word for logs, metrics and tests. The message
    is built from `reason` alone and never holds token text or claim values.
    """

    def __init__(self, reason: AuthErrorReason) -> None:
        if reason not in AUTH_ERROR_REASONS:
            raise ValueError(f"unknown AuthError reason {reason!r}")
        super().__init__(f"{reason}: {_REASON_TEXT[reason]}")
        self.reason: AuthErrorReason = reason


@dataclass(frozen=True)
class AuthConfig:
    """How tokens are verified; built from plain values by the config module.

    Construction checks everything that needs no file I/O and raises
    `ValueError` naming the setting. `TokenVerifier` reads the key files.
    """

    secret: str | None = field(default=None, repr=False)
    """HS* shared secret (`PGRELAY_JWT_SECRET`); at least 32 bytes for HS256."""
    public_key_file: str | os.PathLike[str] | None = None
    """PEM file with one RSA or EC public key, or a certificate."""
    jwks_file: str | os.PathLike[str] | None = None
    """JSON Web Key Set file; tokens pick their key by `kid`."""
    algorithms: Sequence[str] | None = None
    """Allowed `alg` values (a sequence or a comma-separated string); None
    derives them from the keys: HS256 for a secret, and for public keys the
    JWK `alg` or the algorithm matching the key type and curve."""
    audience: str | None = None
    """Required `aud` value; None skips the audience check."""
    issuer: str | None = None
    """Required `iss` value; None skips the issuer check."""
    leeway_s: float = DEFAULT_LEEWAY_S
    """Clock skew allowed on `exp`, `nbf` and `iat`, in seconds."""
    max_token_bytes: int = MAX_TOKEN_BYTES
    """Tokens longer than this are rejected before decoding."""

    def __post_init__(self) -> None:
        if self.secret is None and self.public_key_file is None and self.jwks_file is None:
            raise ValueError(
                f"no JWT verification key is configured: set {SECRET_SETTING}, "
                f"{PUBLIC_KEY_FILE_SETTING} or {JWKS_FILE_SETTING}"
            )
        if self.public_key_file is not None and self.jwks_file is not None:
            raise ValueError(f"set only one of {PUBLIC_KEY_FILE_SETTING} and {JWKS_FILE_SETTING}")
        algorithms = _normalize_algorithms(self.algorithms)
        object.__setattr__(self, "algorithms", algorithms)
        has_public_keys = self.public_key_file is not None or self.jwks_file is not None
        if algorithms is not None:
            hmac_algorithms = [a for a in algorithms if a in HMAC_MIN_SECRET_BYTES]
            public_algorithms = [a for a in algorithms if a not in HMAC_MIN_SECRET_BYTES]
            if hmac_algorithms and self.secret is None:
                raise ValueError(
                    f"{ALGORITHMS_SETTING} allows {hmac_algorithms[0]} "
                    f"but {SECRET_SETTING} is not set"
                )
            if public_algorithms and not has_public_keys:
                raise ValueError(
                    f"{ALGORITHMS_SETTING} allows {public_algorithms[0]} but neither "
                    f"{PUBLIC_KEY_FILE_SETTING} nor {JWKS_FILE_SETTING} is set"
                )
            if self.secret is not None and not hmac_algorithms:
                raise ValueError(
                    f"{SECRET_SETTING} is set but {ALGORITHMS_SETTING} allows no HS* algorithm"
                )
            if has_public_keys and not public_algorithms:
                raise ValueError(
                    f"a public key file is set but {ALGORITHMS_SETTING} allows only HS* algorithms"
                )
        if self.secret is not None:
            hmac_used = [a for a in (algorithms or ("HS256",)) if a in HMAC_MIN_SECRET_BYTES]
            _check_secret(self.secret, hmac_used)
        for value, setting in ((self.audience, AUDIENCE_SETTING), (self.issuer, ISSUER_SETTING)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{setting} must be a non-empty string when set")
        leeway = self.leeway_s
        if (
            isinstance(leeway, bool)
            or not isinstance(leeway, int | float)
            or not math.isfinite(leeway)
            or not 0 <= leeway <= MAX_LEEWAY_S
        ):
            raise ValueError(
                f"{LEEWAY_SETTING} must be a number of seconds between 0 and {MAX_LEEWAY_S}"
            )
        if (
            isinstance(self.max_token_bytes, bool)
            or not isinstance(self.max_token_bytes, int)
            or self.max_token_bytes <= 0
        ):
            raise ValueError("max_token_bytes must be a positive integer")


@dataclass(frozen=True)
class VerifiedToken:
    """The result of a successful `TokenVerifier.verify`."""

    claims: dict[str, Any]
    """All claims of the token, as decoded."""
    subject: str | None
    """The `sub` claim, or None when absent."""
    expires_at: int
    """The `exp` claim in unix seconds (rounded down); leeway not included."""
    claims_json: str
    """The claims as compact JSON for `set_config('request.jwt.claims', ...)`."""


@dataclass(frozen=True)
class _PublicKeyEntry:
    key: PublicKey
    kid: str | None
    jwk_algorithm: str | None
    """The JWK's `alg` member: when present, the only algorithm for this key."""


#: Verified tokens remembered (by a digest of their exact text, signature
#: included) until they expire, so that a client that reconnects or refreshes
#: with the same token is not verified again: about 43 us saved each (HS256),
#: about 300 bytes each kept (compact claims JSON, sub, exp). Oldest first out
#: beyond this many.
VERIFIED_CACHE_SIZE: Final = 10_000


class TokenVerifier:
    """Verify tokens under one `AuthConfig`. Thread-safe (its one piece of state,
    the cache of verified tokens, changes by single dict operations).

    Construction reads the key files and raises `ValueError` (naming the
    setting) when they are unreadable, hold private or weak keys, or do not
    fit the configured algorithms.
    """

    def __init__(self, config: AuthConfig) -> None:
        self.config: Final = config
        self._secret: bytes | None = None
        if config.secret is not None:
            self._secret = config.secret.encode()
            try:
                HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(self._secret)
            except jwt.InvalidKeyError:
                raise ValueError(
                    f"{SECRET_SETTING} looks like a PEM or SSH key; put public keys in "
                    f"{PUBLIC_KEY_FILE_SETTING} or {JWKS_FILE_SETTING}"
                ) from None
        # Prepared once (PyJWT prepares a raw secret again on every decode).
        self._hmac_keys: Mapping[str, jwt.PyJWK] = (
            {
                algorithm: jwt.PyJWK(
                    {"kty": "oct", "k": base64.urlsafe_b64encode(self._secret).decode()},
                    algorithm=algorithm,
                )
                for algorithm in HMAC_MIN_SECRET_BYTES
            }
            if self._secret is not None
            else {}
        )
        self._keys: tuple[_PublicKeyEntry, ...] = ()
        self._uses_jwks = config.jwks_file is not None
        if config.public_key_file is not None:
            self._keys = (_load_pem_file(config.public_key_file),)
        elif config.jwks_file is not None:
            self._keys = _load_jwks_file(config.jwks_file)
        self._keys_by_kid: Mapping[str, _PublicKeyEntry] = {
            entry.kid: entry for entry in self._keys if entry.kid is not None
        }
        self.allowed_algorithms: Final[frozenset[str]] = self._resolve_algorithms()
        self._verified: dict[bytes, tuple[str, str | None, int]] = {}
        """digest of a token -> (claims_json, subject, expires_at)."""

    def _resolve_algorithms(self) -> frozenset[str]:
        key_setting = PUBLIC_KEY_FILE_SETTING if not self._uses_jwks else JWKS_FILE_SETTING
        if self.config.algorithms is None:
            derived = {"HS256"} if self._secret is not None else set()
            for entry in self._keys:
                derived.add(entry.jwk_algorithm or _default_algorithm(entry.key))
            return frozenset(derived)
        for algorithm in self.config.algorithms:
            if algorithm in HMAC_MIN_SECRET_BYTES:
                continue
            if not any(_key_fits(entry, algorithm) for entry in self._keys):
                raise ValueError(
                    f"{ALGORITHMS_SETTING} allows {algorithm} but {key_setting} holds no key for it"
                )
        return frozenset(self.config.algorithms)

    def verify(self, token: str) -> VerifiedToken:
        """Verify `token` now; return its claims or raise `AuthError`."""
        if not isinstance(token, str):
            raise AuthError("malformed")
        if len(token) > self.config.max_token_bytes:
            raise AuthError("too_large")
        if not token.isascii():
            raise AuthError("malformed")
        digest = hashlib.blake2b(token.encode(), digest_size=16).digest()
        known = self._verified.get(digest)
        if known is not None:
            claims_json, subject, expires_at = known
            if time.time() < expires_at + self.config.leeway_s:
                return VerifiedToken(json.loads(claims_json), subject, expires_at, claims_json)
            self._verified.pop(digest, None)
            raise AuthError("expired")
        verified = self._verify(token)
        cache = self._verified
        if len(cache) >= VERIFIED_CACHE_SIZE:
            cache.pop(next(iter(cache)), None)
        cache[digest] = (verified.claims_json, verified.subject, verified.expires_at)
        return verified

    def _verify(self, token: str) -> VerifiedToken:
        header = _peek_header(token)
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.allowed_algorithms:
            raise AuthError("bad_algorithm")
        key = self._select_key(algorithm, header.get("kid"))
        options: Options = {
            "require": ["exp"],
            "verify_aud": self.config.audience is not None,
        }
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway_s,
                options=options,
            )
        except jwt.PyJWTError as error:
            raise AuthError(_reason_for(error)) from None
        except (ValueError, TypeError, OverflowError):
            # Hostile but validly signed claims that PyJWT does not expect.
            raise AuthError("malformed") from None
        return _build_verified(claims)

    def _select_key(self, algorithm: str, kid: object) -> jwt.PyJWK | PublicKey:
        if algorithm in HMAC_MIN_SECRET_BYTES:
            assert self._secret is not None  # allowed_algorithms guarantees it
            return self._hmac_keys[algorithm]
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed")
        entry: _PublicKeyEntry | None
        if not self._uses_jwks:
            entry = self._keys[0]
        elif kid is not None:
            entry = self._keys_by_kid.get(kid)
        else:
            # Without a kid, only a set with a single key is unambiguous.
            entry = self._keys[0] if len(self._keys) == 1 else None
        if entry is None:
            raise AuthError("unknown_kid")
        if not _key_fits(entry, algorithm):
            raise AuthError("bad_algorithm")
        return entry.key


_B64URL_TO_B64 = bytes.maketrans(b"-_", b"+/")


def _peek_header(token: str) -> dict[str, Any]:
    """The JOSE header (unverified), to pick the key: strict base64url and a JSON
    object, else `malformed`. PyJWT checks the whole token again when it
    verifies; this only spares parsing it twice."""
    head, dot, _ = token.partition(".")
    if not dot or not head:
        raise AuthError("malformed")
    try:
        data = binascii.a2b_base64(
            head.encode().translate(_B64URL_TO_B64) + b"=" * (-len(head) % 4), strict_mode=True
        )
        header = json.loads(data)
    except (binascii.Error, ValueError):
        raise AuthError("malformed") from None
    if not isinstance(header, dict):
        raise AuthError("malformed")
    return header


def mint_token(
    secret: str,
    *,
    orgs: Sequence[str] | None,
    sub: str | None,
    lifetime_s: int = DEFAULT_TOKEN_LIFETIME_S,
    audience: str | None = None,
    issuer: str | None = None,
    now: int | None = None,
) -> str:
    """Make an HS256 token with `sub`, `iat`, `exp` and organization claims.

    One org gives claim `org_id`; zero or several give `org_ids` (canonical
    uuid strings); None gives neither. `now` (unix seconds) defaults to the
    current time.
    """
    _check_secret(secret, ["HS256"])
    if isinstance(lifetime_s, bool) or not isinstance(lifetime_s, int) or lifetime_s <= 0:
        raise ValueError("lifetime_s must be a positive integer")
    issued_at = int(time.time()) if now is None else now
    claims: dict[str, Any] = {}
    if sub is not None:
        claims["sub"] = sub
    claims["iat"] = issued_at
    claims["exp"] = issued_at + lifetime_s
    if orgs is not None:
        org_ids = [_canonical_uuid(org) for org in orgs]
        if len(org_ids) == 1:
            claims["org_id"] = org_ids[0]
        else:
            claims["org_ids"] = org_ids
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")


def _normalize_algorithms(algorithms: Sequence[str] | None) -> tuple[str, ...] | None:
    if algorithms is None:
        return None
    names = algorithms.split(",") if isinstance(algorithms, str) else list(algorithms)
    normalized: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"{ALGORITHMS_SETTING} must hold algorithm names")
        name = name.strip()
        if name not in SUPPORTED_ALGORITHMS:
            raise ValueError(
                f"{ALGORITHMS_SETTING}: {name!r} is not supported; "
                f"choose from {', '.join(sorted(SUPPORTED_ALGORITHMS))}"
            )
        if name not in normalized:
            normalized.append(name)
    if not normalized:
        raise ValueError(f"{ALGORITHMS_SETTING} is empty")
    return tuple(normalized)


def _check_secret(secret: str, hmac_algorithms: Sequence[str]) -> None:
    if not isinstance(secret, str):
        raise ValueError(f"{SECRET_SETTING} must be a string")
    needed = max((HMAC_MIN_SECRET_BYTES[a] for a in hmac_algorithms), default=32)
    if len(secret.encode()) < needed:
        raise ValueError(
            f"{SECRET_SETTING} is shorter than {needed} bytes "
            f"(RFC 7518 §3.2 requires a key at least as long as the hash)"
        )


def _canonical_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"organization id {value!r} is not a uuid") from None


def _default_algorithm(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    for algorithm, curve in _EC_CURVE_BY_ALGORITHM.items():
        if isinstance(key.curve, curve):
            return algorithm
    raise AssertionError("unsupported curves are refused when keys are loaded")


def _key_fits(entry: _PublicKeyEntry, algorithm: str) -> bool:
    if entry.jwk_algorithm is not None and entry.jwk_algorithm != algorithm:
        return False
    if algorithm in _RSA_ALGORITHMS:
        return isinstance(entry.key, rsa.RSAPublicKey)
    curve = _EC_CURVE_BY_ALGORITHM.get(algorithm)
    return (
        curve is not None
        and isinstance(entry.key, ec.EllipticCurvePublicKey)
        and isinstance(entry.key.curve, curve)
    )


def _check_public_key(key: object, where: str) -> PublicKey:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_KEY_BITS:
            raise ValueError(
                f"{where} holds a {key.key_size}-bit RSA key; "
                f"at least {MIN_RSA_KEY_BITS} bits are required"
            )
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not any(isinstance(key.curve, c) for c in _EC_CURVE_BY_ALGORITHM.values()):
            raise ValueError(
                f"{where} holds an EC key on curve {key.curve.name}; use P-256, P-384 or P-521"
            )
        return key
    raise ValueError(f"{where} holds a {type(key).__name__}; use an RSA or EC public key")


def _read_key_file(path: str | os.PathLike[str], setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{setting}: cannot read {os.fspath(path)!r}: {error.strerror}") from None


def _load_pem_file(path: str | os.PathLike[str]) -> _PublicKeyEntry:
    data = _read_key_file(path, PUBLIC_KEY_FILE_SETTING)
    if b"PRIVATE KEY" in data:
        raise ValueError(
            f"{PUBLIC_KEY_FILE_SETTING} holds a private key; give the daemon only the public key"
        )
    key: object
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ValueError(
            f"{PUBLIC_KEY_FILE_SETTING}: {os.fspath(path)!r} is not a PEM public key or certificate"
        ) from None
    return _PublicKeyEntry(_check_public_key(key, PUBLIC_KEY_FILE_SETTING), None, None)


def _load_jwks_file(path: str | os.PathLike[str]) -> tuple[_PublicKeyEntry, ...]:
    data = _read_key_file(path, JWKS_FILE_SETTING)
    try:
        document = json.loads(data)
    except ValueError:
        raise ValueError(f"{JWKS_FILE_SETTING}: {os.fspath(path)!r} is not JSON") from None
    jwks = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(jwks, list):
        raise ValueError(f'{JWKS_FILE_SETTING}: expected an object with a "keys" array')
    entries: list[_PublicKeyEntry] = []
    seen_kids: set[str] = set()
    for index, jwk in enumerate(jwks):
        where = f"{JWKS_FILE_SETTING} key #{index}"
        if not isinstance(jwk, dict):
            raise ValueError(f"{where} is not a JSON object")
        if jwk.get("use", "sig") != "sig":
            continue  # an encryption key: not for verifying signatures
        if jwk.get("kty") == "oct":
            raise ValueError(f"{where} is a symmetric key; put HS* secrets in {SECRET_SETTING}")
        if "d" in jwk:
            raise ValueError(f"{where} holds a private key; publish only public keys")
        kid = jwk.get("kid")
        if kid is not None and (not isinstance(kid, str) or not kid):
            raise ValueError(f"{where} has a kid that is not a non-empty string")
        if kid is not None and kid in seen_kids:
            raise ValueError(f"{where}: kid {kid!r} appears twice")
        jwk_algorithm = jwk.get("alg")
        if jwk_algorithm is not None and jwk_algorithm not in SUPPORTED_ALGORITHMS:
            raise ValueError(f"{where}: alg {jwk_algorithm!r} is not supported")
        try:
            key = jwt.PyJWK(jwk).key
        except jwt.PyJWTError as error:
            raise ValueError(f"{where} is not a usable public key: {error}") from None
        entry = _PublicKeyEntry(_check_public_key(key, where), kid, jwk_algorithm)
        if jwk_algorithm is not None and not _key_fits(entry, jwk_algorithm):
            raise ValueError(f"{where}: alg {jwk_algorithm} does not fit the key type")
        if kid is not None:
            seen_kids.add(kid)
        entries.append(entry)
    if not entries:
        raise ValueError(f"{JWKS_FILE_SETTING} holds no signature keys")
    if len(entries) > 1 and any(entry.kid is None for entry in entries):
        raise ValueError(f"{JWKS_FILE_SETTING}: with several keys, every key needs a kid")
    return tuple(entries)


def _reason_for(error: jwt.PyJWTError) -> AuthErrorReason:
    # Subclasses before their bases: InvalidSignatureError is a DecodeError.
    if isinstance(error, jwt.InvalidSignatureError):
        return "bad_signature"
    if isinstance(error, jwt.ExpiredSignatureError):
        return "expired"
    if isinstance(error, jwt.ImmatureSignatureError):
        return "not_yet_valid"
    if isinstance(error, jwt.InvalidAudienceError):
        return "bad_audience"
    if isinstance(error, jwt.InvalidIssuerError):
        return "bad_issuer"
    if isinstance(error, jwt.MissingRequiredClaimError):
        if error.claim == "exp":
            return "missing_exp"
        if error.claim == "aud":
            return "bad_audience"
        if error.claim == "iss":
            return "bad_issuer"
        return "malformed"
    if isinstance(error, jwt.InvalidAlgorithmError | jwt.InvalidKeyError):
        return "bad_algorithm"
    return "malformed"


def _is_time(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _build_verified(claims: dict[str, Any]) -> VerifiedToken:
    # PyJWT accepts numeric strings ("exp": "1700000000"); RFC 7519 says NumericDate.
    exp = claims["exp"]
    if not _is_time(exp):
        raise AuthError("malformed")
    if any(name in claims and not _is_time(claims[name]) for name in ("nbf", "iat")):
        raise AuthError("malformed")
    subject = claims.get("sub")
    if subject is not None and not isinstance(subject, str):
        raise AuthError("malformed")
    try:
        # allow_nan=False: Postgres jsonb has no NaN or Infinity.
        claims_json = json.dumps(claims, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise AuthError("malformed") from None
    return VerifiedToken(
        claims=claims,
        subject=subject,
        expires_at=math.floor(exp),
        claims_json=claims_json,
    )
