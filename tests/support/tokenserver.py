"""A token server for distribution's `auth: token`, signing RS256 JWTs with `cryptography`.

distribution 2.8 accepts a JWT whose header carries the signing certificate in `x5c` when
that certificate is in its `rootcertbundle`. The `access` claim lists what is granted.

    ts = TokenServer(workdir, users={"alice": ("secret", ["pull", "push"])}).start()
    reg = Registry(workdir / "reg", auth=ts.registry_auth_config()).start()

Policy: anonymous requests get `pull` on repositories for which `anonymous_pull(name)` is
true (default: every name not starting with "private/"); an authenticated user gets the
actions listed for them, on every repository. Wrong credentials → 401. Every request is
recorded in `requests` (path, query, user or None) for assertions.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"
SERVICE = "mirror-tests-registry"
ISSUER = "mirror-tests-token-issuer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_signing_cert() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A fresh RSA key and a self-signed certificate for it (valid ±1 day)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror-tests token signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def sign_jwt(
    key: rsa.RSAPrivateKey, cert: x509.Certificate, claims: dict[str, Any]
) -> str:
    header = {
        "typ": "JWT",
        "alg": "RS256",
        "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
    }
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + _b64url(sig)


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """`repository:name:pull,push` → ("repository", "name", ["pull", "push"])."""
    parts = scope.split(":")
    if len(parts) < 3:
        return None
    return parts[0], ":".join(parts[1:-1]), [a for a in parts[-1].split(",") if a]


@dataclass(frozen=True)
class TokenRequest:
    path: str
    query: dict[str, list[str]]
    user: str | None
    status: int

    @property
    def scopes(self) -> list[str]:
        return self.query.get("scope", [])


def _default_anonymous_pull(name: str) -> bool:
    return not name.startswith("private/")


# The users the integration tests' token servers know: user -> (password, actions)
TOKEN_USERS: dict[str, tuple[str, list[str]]] = {
    "admin": ("adminpw", ["pull", "push"]),
    "reader": ("readerpw", ["pull"]),
}


@dataclass
class TokenServer:
    workdir: Path
    # user -> (password, actions granted on every repository)
    users: dict[str, tuple[str, Sequence[str]]] = field(default_factory=dict)
    anonymous_pull: Callable[[str], bool] = _default_anonymous_pull
    expires_in: int = 300
    service: str = SERVICE
    issuer: str = ISSUER

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = make_signing_cert()
        self.cert_path = self.workdir / "token-signer.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def rotate_key(self) -> None:
        """Sign with a new key and certificate from now on (rewrites cert_path). A registry
        started before the rotation rejects the new tokens, one restarted after it rejects
        the old ones: that makes a cached token go bad without waiting for it to expire."""
        self.key, self.cert = make_signing_cert()
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @property
    def realm(self) -> str:
        return f"http://{HOST}:{self.port}/token"

    def registry_auth_config(self) -> dict[str, Any]:
        """The `auth:` section for the registry's config."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.cert_path),
            }
        }

    def grant(self, user: str | None, scopes: Sequence[str]) -> list[dict[str, Any]]:
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            typ, name, wanted = parsed
            if typ != "repository":
                continue
            if user is None:
                allowed = {"pull"} if self.anonymous_pull(name) else set()
            else:
                allowed = set(self.users[user][1])
            actions = [a for a in wanted if a in allowed]
            if actions:
                access.append({"type": typ, "name": name, "actions": actions})
        return access

    def issue(self, user: str | None, scopes: Sequence[str]) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": self.grant(user, scopes),
        }
        token = sign_jwt(self.key, self.cert, claims)
        issued = datetime.datetime.fromtimestamp(now, datetime.UTC)
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def start(self) -> TokenServer:
        server_ref = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                if url.path != "/token":
                    server_ref._record(TokenRequest(url.path, query, None, 404))
                    self._send(404, {"errors": [{"code": "NOT_FOUND"}]}, {})
                    return
                user: str | None = None
                auth = self.headers.get("Authorization")
                if auth:
                    scheme, _, cred = auth.partition(" ")
                    ok = False
                    if scheme.lower() == "basic":
                        try:
                            u, _, p = base64.b64decode(cred).decode().partition(":")
                        except (ValueError, UnicodeDecodeError):
                            u, p = "", ""
                        if u in server_ref.users and server_ref.users[u][0] == p:
                            ok, user = True, u
                    if not ok:
                        server_ref._record(TokenRequest(url.path, query, None, 401))
                        self._send(
                            401,
                            {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                            {"WWW-Authenticate": 'Basic realm="mirror-tests"'},
                        )
                        return
                server_ref._record(TokenRequest(url.path, query, user, 200))
                self._send(200, server_ref.issue(user, query.get("scope", [])), {})

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def requests_by(self, user: str | None) -> list[TokenRequest]:
        with self._lock:
            return [r for r in self.requests if r.user == user and r.status == 200]
