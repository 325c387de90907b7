"""Registry pieces only tests need, around devkit's loopback registry: a bearer-token service
and htpasswd basic auth (each gives LocalRegistry its `auth:` section), and a port that refuses
connections.

The token service signs RS256 JWTs with an openssl-made key; the registry trusts them because
the token header's x5c carries the self-signed certificate that its rootcertbundle holds.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# Re-exported for the benchmarks, which import them from here.
from devkit.busybox import push_busybox_image as busybox_image
from devkit.images import PushedManifest, push_image, push_image_manifest, push_index, tar_layer
from devkit.registry import LocalRegistry

__all__ = [
    "LocalRegistry",
    "PushedManifest",
    "TokenServer",
    "busybox_image",
    "htpasswd_auth",
    "push_image",
    "push_image_manifest",
    "push_index",
    "refused_host",
    "tar_layer",
]


def run_openssl(*args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], input=data, capture_output=True, check=True).stdout


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The `auth: token` service: checks basic credentials, grants what the scope asks for."""

    def __init__(self, workdir: Path, users: dict[str, str]) -> None:
        self.users = users
        self.service = "test-registry"
        self.issuer = "test-token-issuer"
        self.key = workdir / "token.key"
        self.cert = workdir / "token.crt"
        run_openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
            "-out", str(self.cert), "-days", "2", "-subj", "/CN=test-token-issuer",
        )  # fmt: skip
        self._cert_der = run_openssl("x509", "-in", str(self.cert), "-outform", "DER")
        self.requests: list[tuple[str | None, str]] = []  # (user, scope) per token request
        self.identity_tokens = {f"refresh-{user}": user for user in users}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                """Docker's token request: basic credentials (or none) and the scope."""
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                user = server.check_basic(self.headers.get("Authorization", ""))
                self.grant(user, query.get("scope", [""])[0])

            def do_POST(self) -> None:
                """OAuth2 refresh-token grant (identity tokens from `docker login`)."""
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                refresh = form.get("refresh_token", [""])[0]
                user = server.identity_tokens.get(refresh)
                if form.get("grant_type") != ["refresh_token"]:
                    user = None
                self.grant(user, form.get("scope", [""])[0])

            def grant(self, user: str | None, scope: str) -> None:
                server.requests.append((user or None, scope))
                if user is None:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"token": server.sign(user, scope), "expires_in": 300})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self._http.server_address[1]}/token"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def check_basic(self, header: str) -> str | None:
        """The user the Basic header names if the password is right, "" for no header (an
        anonymous token: no access), None for wrong credentials."""
        if not header.startswith("Basic "):
            return ""
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else None

    def sign(self, user: str, scope: str) -> str:
        access = []
        if user and scope.count(":") >= 2:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._cert_der).decode()]}
        claims = {
            "iss": self.issuer, "sub": user, "aud": self.service, "exp": now + 300,
            "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access,
        }  # fmt: skip
        signed = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        signature = run_openssl("dgst", "-sha256", "-sign", str(self.key), data=signed.encode())
        return f"{signed}.{b64url(signature)}"

    def registry_auth(self) -> dict[str, Any]:
        """The registry's `auth:` section: trust this service's tokens."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.cert),
            }
        }

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def htpasswd_auth(workdir: Path, users: dict[str, str]) -> dict[str, Any]:
    """The registry's `auth:` section for htpasswd basic auth of `users` (file in `workdir`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    htpasswd = workdir / "htpasswd"
    htpasswd.write_bytes(
        b"".join(
            subprocess.run(
                ["htpasswd", "-Bbn", user, password], capture_output=True, check=True
            ).stdout.strip() + b"\n"
            for user, password in users.items()
        )
    )  # fmt: skip
    return {"htpasswd": {"realm": "test-registry", "path": str(htpasswd)}}


@contextmanager
def refused_host() -> Iterator[str]:
    """A 127.0.0.1 port nothing listens on (bound, never listening: connections are refused)
    for the duration of the block."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"
