"""Build and push OCI images without a container engine: layers from file dicts, compressed
the ways real images are (gzip, zstd, none), manifests in OCI or Docker form, and indexes,
through the registry's v2 upload API."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import zstandard

from devkit.registry import LocalRegistry

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


class Pusher:
    """The registry's upload API through urllib, answering basic and bearer challenges with
    the registry's credentials."""

    def __init__(self, registry: LocalRegistry) -> None:
        self.registry = registry
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
                    raise RuntimeError(f"{method} {url}: {exc.code} {exc.read()!r}") from exc
                scheme, _, params = exc.headers["WWW-Authenticate"].partition(" ")
                self._tokens[scope] = self._answer(
                    scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', params)), scope
                )
        raise AssertionError("unreachable")

    def _answer(self, scheme: str, params: dict[str, str], scope: str) -> str:
        credentials = self.registry.credentials
        if credentials is None:
            raise RuntimeError("the registry wants auth; give it credentials")
        basic = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
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
