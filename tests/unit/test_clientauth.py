import base64
import json
from pathlib import Path

import bcrypt
import pytest

from mirror.http.clientauth import (
    Authenticator,
    Identity,
    bearer_challenge,
    load_htpasswd,
    parse_basic,
)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def auth() -> Authenticator:
    users = {"alice": bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4))}
    return Authenticator(users, b"k" * 32, token_lifetime=60)


def test_htpasswd_bcrypt_only(tmp_path: Path) -> None:
    f = tmp_path / "htpasswd"
    f.write_text("# users\nalice:$2y$05$abcdefghijklmnopqrstuuJ0Xo7k1b6wRkKXx8.yQ/2gPg6mKQ1i\n\n")
    assert list(load_htpasswd(f)) == ["alice"]
    f.write_text("bob:{SHA}plainsha1\n")
    with pytest.raises(ValueError, match=r"htpasswd:1: not a bcrypt entry"):
        load_htpasswd(f)


def test_basic_parsing() -> None:
    assert parse_basic(basic("u", "p:w")) == ("u", "p:w")
    assert parse_basic("Basic !!!") is None
    assert parse_basic("Basic \xe9\xe9") is None
    assert parse_basic("Bearer x") is None
    assert parse_basic("Basic " + base64.b64encode(b"nocolon").decode()) is None


async def test_identify(auth: Authenticator) -> None:
    assert await auth.identify(basic("alice", "secret")) is not None
    assert await auth.identify(basic("alice", "wrong")) is None
    assert await auth.identify(basic("mallory", "secret")) is None
    assert await auth.identify(None) is None


def test_tokens_sign_expire_and_resist_tampering(auth: Authenticator) -> None:
    token = auth.issue(Identity("alice"), now=1000)
    ident = auth.verify_token(token, now=1030)
    assert ident is not None and ident.user == "alice" and not ident.anonymous
    assert auth.verify_token(token, now=1061) is None  # expired
    _payload, sig = token.split(".")
    forged = base64.urlsafe_b64encode(b'{"sub": "root", "exp": 9999999999}').decode()
    assert auth.verify_token(f"{forged.rstrip('=')}.{sig}") is None
    other = Authenticator({}, b"other-secret", 60)
    assert other.verify_token(auth.issue(Identity("alice"))) is None
    anon = auth.verify_token(auth.issue(Identity("")))
    assert anon is not None and anon.anonymous


def test_challenge() -> None:
    assert bearer_challenge("https://m/token", "repository:a:pull") == \
        'Bearer realm="https://m/token",service="registry-mirror",scope="repository:a:pull"'


def _signed(auth: Authenticator, claims: dict[str, object]) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{payload}.{auth._sign(payload)}"


@pytest.mark.parametrize("token", [
    "", ".", "x", "\xe9.abc", "abc.\udce9", "a" * 5000, "e30.e30.e30",  # JWT-shaped
])
def test_tokens_that_are_not_ours_are_refused_not_raised(auth: Authenticator,
                                                          token: str) -> None:
    assert auth.verify_token(token) is None


def test_a_token_for_another_service_or_without_one_is_refused(auth: Authenticator) -> None:
    assert auth.verify_token(_signed(auth, {"sub": "alice", "exp": 9e9,
                                            "aud": "registry-mirror"})) is not None
    assert auth.verify_token(_signed(auth, {"sub": "alice", "exp": 9e9,
                                            "aud": "other-service"})) is None
    assert auth.verify_token(_signed(auth, {"sub": "alice", "exp": 9e9})) is None
    assert auth.verify_token(_signed(auth, {"sub": "alice", "exp": "soon",
                                            "aud": "registry-mirror"})) is None
