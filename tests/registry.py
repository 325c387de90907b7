"""A real OCI registry for tests: Debian's docker-registry (distribution 2.8) on 127.0.0.1,
optionally behind htpasswd basic auth or bearer tokens from an in-test token service, plus
helpers that push images and indexes through the v2 upload API and build a runnable busybox
image from the host's static /bin/busybox.

The token service signs RS256 JWTs with an openssl-made key; the registry trusts them because
the token header's x5c carries the self-signed certificate that its rootcertbundle holds.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import secrets
import socket
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import zstandard

REGISTRY_BINARY = "/usr/bin/docker-registry"
BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "sh", "echo", "cat", "sleep", "ls", "id", "env", "true", "false", "pwd", "mkdir", "rm",
    "touch", "test", "grep", "head", "tail", "wc", "hostname", "uname", "kill", "ps", "date",
    "stat", "whoami", "mount", "df", "cp", "mv", "ln", "chmod", "sed", "tr", "cut", "sort", "seq",
    "printf", "timeout", "find", "nproc", "mkfifo", "readlink", "tee",
)  # fmt: skip
# Debian's busybox-static has no printenv applet; this script behaves like coreutils' printenv.
PRINTENV = b"""#!/bin/sh
[ $# -eq 0 ] && exec env
status=0
for name in "$@"; do
  if eval "[ -n \\"\\${$name+set}\\" ]"
  then eval "printf '%s\\n' \\"\\$$name\\""
  else status=1
  fi
done
exit $status
"""
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnobody:x:65534:\n"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_TYPES = {
    (True, "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    (True, "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    (True, "none"): "application/vnd.oci.image.layer.v1.tar",
    (False, "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
}


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


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

    def registry_config(self) -> dict[str, Any]:
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


@dataclass
class LocalRegistry:
    """docker-registry serving on 127.0.0.1 (a port it picks) from a storage dir in `workdir`.

    `users` turns auth on: bearer tokens from a TokenServer (`token_auth=True`) or htpasswd
    basic auth. The pushing helpers below use `users`'s first entry.
    """

    workdir: Path
    users: dict[str, str] = field(default_factory=dict)
    token_auth: bool = True
    host: str = ""
    token_server: TokenServer | None = None
    _process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def log_file(self) -> Path:
        return self.workdir / "registry.log"

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (to tamper with it)."""
        algorithm, _, hex_digest = digest.partition(":")
        blobs = self.storage / "docker/registry/v2/blobs"
        return blobs / algorithm / hex_digest[:2] / hex_digest / "data"

    def blob_downloads(self, digest: str) -> int:
        """How many GETs of the blob the registry answered (from its request log)."""
        return sum(
            "response completed" in line
            and "http.request.method=GET" in line
            and f'/blobs/{digest}"' in line
            for line in self.log_file.read_text(errors="replace").splitlines()
        )

    def start(self) -> LocalRegistry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
            },
            "http": {"addr": "127.0.0.1:0", "secret": secrets.token_hex(16)},
        }
        if self.users and self.token_auth:
            self.token_server = TokenServer(self.workdir, self.users)
            config["auth"] = self.token_server.registry_config()
        elif self.users:
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_bytes(
                b"".join(
                    subprocess.run(
                        ["htpasswd", "-Bbn", user, password], capture_output=True, check=True
                    ).stdout.strip() + b"\n"
                    for user, password in self.users.items()
                )
            )  # fmt: skip
            config["auth"] = {"htpasswd": {"realm": "test-registry", "path": str(htpasswd)}}
        config_file = self.workdir / "config.yml"
        config_file.write_text(json.dumps(config))  # YAML is a superset of JSON
        with self.log_file.open("wb") as log:
            self._process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config_file)], stdout=log, stderr=log
            )
        try:
            self.host = self._wait_listening()
            self._wait_answering()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        assert self._process is not None
        while time.monotonic() < deadline and self._process.poll() is None:
            for line in self.log_file.read_text(errors="replace").splitlines():
                if 'msg="listening on ' in line:
                    return line.split('msg="listening on ', 1)[1].split('"', 1)[0]
            time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not start:\n{self.log_file.read_text()}")

    def _wait_answering(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=5):
                    return
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"docker-registry at {self.host} never answered /v2/")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)
            self._process = None
        if self.token_server is not None:
            self.token_server.close()
            self.token_server = None


class Pusher:
    """The registry's upload API through urllib, answering basic and bearer challenges."""

    def __init__(self, registry: LocalRegistry) -> None:
        self.registry = registry
        self.credentials = next(iter(registry.users.items()), None)
        self._tokens: dict[str, str] = {}

    def request(
        self, method: str, url: str, repo: str, data: bytes | None = None, content_type: str = ""
    ) -> tuple[int, dict[str, str]]:
        """Send a request; returns (status, headers). Retries once with auth after a 401."""
        scope = f"repository:{repo}:pull,push"
        for attempt in range(2):
            request = urllib.request.Request(url, data=data, method=method)
            if content_type:
                request.add_header("Content-Type", content_type)
            if scope in self._tokens:
                request.add_header("Authorization", self._tokens[scope])
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, dict(response.headers)
            except urllib.error.HTTPError as exc:
                if exc.code != 401 or attempt:
                    raise AssertionError(f"{method} {url}: {exc.code} {exc.read()!r}") from exc
                scheme, _, params = exc.headers["WWW-Authenticate"].partition(" ")
                self._tokens[scope] = self._answer(
                    scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', params)), scope
                )
        raise AssertionError("unreachable")

    def _answer(self, scheme: str, params: dict[str, str], scope: str) -> str:
        assert self.credentials is not None, "the registry wants auth; give it users"
        basic = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        if scheme == "basic":
            return basic
        query = urllib.parse.urlencode({"service": params["service"], "scope": scope})
        request = urllib.request.Request(f"{params['realm']}?{query}")
        request.add_header("Authorization", basic)
        with urllib.request.urlopen(request, timeout=30) as response:
            return f"Bearer {json.load(response)['token']}"

    def blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        base = f"{self.registry.url}/v2/{repo}"
        _, headers = self.request("POST", f"{base}/blobs/uploads/", repo, data=b"")
        location = urllib.parse.urljoin(base, headers["Location"])
        separator = "&" if "?" in location else "?"
        url = f"{location}{separator}digest={urllib.parse.quote(digest)}"
        self.request("PUT", url, repo, data=data, content_type="application/octet-stream")
        return digest

    def manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        url = f"{self.registry.url}/v2/{repo}/manifests/{ref}"
        self.request("PUT", url, repo, data=body, content_type=media_type)
        return sha256(body)


@contextmanager
def refused_host() -> Iterator[str]:
    """A 127.0.0.1 port nothing listens on (bound, never listening: connections are refused)
    for the duration of the block."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def tar_layer(files: dict[str, bytes]) -> bytes:
    """An uncompressed layer tar of regular files (parent directories added, 0755)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        dirs: set[str] = set()
        for path in sorted(files):
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in dirs:
                    dirs.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    archive.addfile(info)
            info = tarfile.TarInfo(path.strip("/"))
            info.size = len(files[path])
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(files[path]))
    return buffer.getvalue()


def compress(tar: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(tar, mtime=0)  # deterministic: equal layers share a digest
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(tar)
    return tar


@dataclass(frozen=True)
class PushedManifest:
    digest: str
    size: int
    media_type: str
    config_digest: str  # the image id the store will give it
    diff_ids: tuple[str, ...]
    layer_digests: tuple[str, ...]


def push_image_manifest(
    registry: LocalRegistry,
    repo: str,
    tag: str | None,
    layers: list[dict[str, bytes] | bytes],
    config: dict[str, Any] | None = None,
    *,
    architecture: str = "amd64",
    compression: str = "gzip",
    oci: bool = True,
) -> PushedManifest:
    """Push an image (layers: file dicts or uncompressed tar bytes; config: the "config"
    section of the image config) and its manifest, tagged `tag` or only by digest."""
    pusher = Pusher(registry)
    tars = [layer if isinstance(layer, bytes) else tar_layer(layer) for layer in layers]
    blobs = [compress(tar, compression) for tar in tars]
    layer_digests = tuple(pusher.blob(repo, blob) for blob in blobs)
    diff_ids = tuple(sha256(tar) for tar in tars)
    config_blob = json.dumps(
        {
            "architecture": architecture,
            "os": "linux",
            "config": config or {"Env": [PATH_ENV]},
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        }
    ).encode()
    config_digest = pusher.blob(repo, config_blob)
    media_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
                "digest": config_digest,
                "size": len(config_blob),
            },
            "layers": [
                {"mediaType": LAYER_TYPES[oci, compression], "digest": digest, "size": len(blob)}
                for digest, blob in zip(layer_digests, blobs, strict=True)
            ],
        }
    ).encode()
    digest = pusher.manifest(repo, tag or sha256(manifest), manifest, media_type)
    return PushedManifest(digest, len(manifest), media_type, config_digest, diff_ids, layer_digests)


def push_image(
    registry: LocalRegistry,
    repo: str,
    tag: str | None,
    layers: list[dict[str, bytes] | bytes],
    config: dict[str, Any] | None = None,
    **options: Any,
) -> str:
    """Push an image; returns its manifest digest."""
    return push_image_manifest(registry, repo, tag, layers, config, **options).digest


def push_index(
    registry: LocalRegistry,
    repo: str,
    tag: str,
    entries: list[tuple[PushedManifest, str]],
    *,
    oci: bool = True,
) -> str:
    """Push an OCI index (or Docker manifest list) of already pushed manifests, each with its
    "os/architecture"; returns the index digest."""
    media_type = OCI_INDEX if oci else DOCKER_LIST
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {
                    "mediaType": pushed.media_type,
                    "digest": pushed.digest,
                    "size": pushed.size,
                    "platform": {
                        "os": platform.split("/")[0],
                        "architecture": platform.split("/")[1],
                    },
                }
                for pushed, platform in entries
            ],
        }
    ).encode()
    return Pusher(registry).manifest(repo, tag, index, media_type)


def busybox_layer() -> bytes:
    """An uncompressed layer with a runnable userland: static busybox, applet symlinks and
    printenv in /bin, /etc/passwd and /etc/group (root and nobody 65534), the mount points."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, mode in [("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("proc", 0o555),
                           ("root", 0o700), ("sys", 0o555), ("tmp", 0o1777)]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            archive.addfile(info)
        binary = BUSYBOX.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size = len(binary)
        info.mode = 0o755
        archive.addfile(info, io.BytesIO(binary))
        for applet in BUSYBOX_APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            info.mode = 0o777
            archive.addfile(info)
        for name, content, mode in [
            ("etc/passwd", PASSWD, 0o644),
            ("etc/group", GROUP, 0o644),
            ("bin/printenv", PRINTENV, 0o755),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = mode
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def busybox_image(registry: LocalRegistry, repo: str = "test/busybox", tag: str = "1") -> str:
    """Push the busybox image; returns its reference ("127.0.0.1:PORT/test/busybox:1")."""
    push_image(registry, repo, tag, [busybox_layer()], {"Env": [PATH_ENV], "Cmd": ["sh"]})
    return f"{registry.host}/{repo}:{tag}"
