"""A real OCI registry on loopback: Debian's docker-registry (distribution 2.8) serving on
127.0.0.1 from a storage directory, with whatever `auth:` configuration the caller gives it (the
tests add htpasswd and token auth; the demo runs it open). Loopback registries are plain HTTP
for vgpu-runtime, as for Docker and containerd, so nothing needs certificates."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGISTRY_BINARY = Path("/usr/bin/docker-registry")


@dataclass
class LocalRegistry:
    """docker-registry serving on 127.0.0.1 (a port it picks) from a storage dir in `workdir`.

    `auth` is the `auth:` section of the registry's configuration (none: open to anyone);
    `credentials` are the (user, password) the push helpers answer its challenges with.
    """

    workdir: Path
    auth: dict[str, Any] = field(default_factory=dict)
    credentials: tuple[str, str] | None = None
    host: str = ""
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
        """Start and wait until /v2/ answers; fails with the registry's log."""
        if not REGISTRY_BINARY.is_file():
            raise RuntimeError(
                f"{REGISTRY_BINARY} not found: install Debian's docker-registry (scripts/setup.sh)"
            )
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
        if self.auth:
            config["auth"] = self.auth
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
