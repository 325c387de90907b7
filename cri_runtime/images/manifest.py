"""Manifests, indexes and image configs (Docker schema 2 and OCI), parsed into the few fields a
pull needs. Anything else (schema 1, artifacts, other platforms) is CorruptImage with a reason.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cri_runtime.images.digest import is_digest
from cri_runtime.images.errors import CorruptImage

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])

CONFIG_TYPES = frozenset(
    {"application/vnd.docker.container.image.v1+json", "application/vnd.oci.image.config.v1+json"}
)
LAYER_TYPES = frozenset(
    {
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)

OS = "linux"
ARCHITECTURE = "amd64"
MAX_MANIFEST_BYTES = 4 << 20  # containerd's limit: bigger is an attack, not an image
MAX_CONFIG_BYTES = 32 << 20


class Platform(BaseModel):
    model_config = ConfigDict(extra="ignore")

    os: str = ""
    architecture: str = ""
    variant: str = ""


class Descriptor(BaseModel):
    """A pointer to content: its media type, digest and size."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    media_type: str = Field(default="", alias="mediaType")
    digest: str
    size: int = Field(ge=0)
    platform: Platform | None = None


class ImageManifest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    config: Descriptor
    layers: list[Descriptor]


class ImageIndex(BaseModel):
    model_config = ConfigDict(extra="ignore")

    manifests: list[Descriptor]


class ContainerConfig(BaseModel):
    """The runtime defaults in an image config (Docker's capitalised keys; null = absent)."""

    model_config = ConfigDict(extra="ignore")

    Entrypoint: list[str] | None = None
    Cmd: list[str] | None = None
    Env: list[str] | None = None
    WorkingDir: str | None = None
    User: str | None = None
    Labels: dict[str, str] | None = None
    StopSignal: str | None = None


class RootFs(BaseModel):
    model_config = ConfigDict(extra="ignore")

    diff_ids: list[str]


class ImageConfigBlob(BaseModel):
    model_config = ConfigDict(extra="ignore")

    os: str = ""
    architecture: str = ""
    config: ContainerConfig | None = None
    rootfs: RootFs


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptImage(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise CorruptImage(f"{what} is not a JSON object")
    return document


def manifest_kind(data: bytes, content_type: str, what: str) -> str:
    """The manifest's media type: its own `mediaType`, else the HTTP Content-Type, else
    guessed from its shape (OCI allows omitting mediaType)."""
    document = _load_json(data, what)
    media_type = document.get("mediaType") or content_type.split(";")[0].strip()
    if media_type in MANIFEST_TYPES | INDEX_TYPES:
        return str(media_type)
    if "manifests" in document:
        return OCI_INDEX
    if "layers" in document and "config" in document:
        return OCI_MANIFEST
    raise CorruptImage(f"{what} has unsupported media type {media_type!r}")


def parse_index(data: bytes, what: str) -> ImageIndex:
    try:
        index = ImageIndex.model_validate(_load_json(data, what))
    except ValidationError as exc:
        raise CorruptImage(f"{what} is not a valid image index: {exc}") from exc
    for entry in index.manifests:
        _check_descriptor(entry, what)
    return index


def select_platform(index: ImageIndex, what: str) -> Descriptor:
    """The linux/amd64 entry (one without a variant first: amd64 variants need newer CPUs)."""
    matches = [
        entry
        for entry in index.manifests
        if entry.platform is not None
        and entry.platform.os == OS
        and entry.platform.architecture == ARCHITECTURE
    ]
    if not matches:
        found = sorted(
            {f"{entry.platform.os}/{entry.platform.architecture}" for entry in index.manifests
             if entry.platform is not None}
        )  # fmt: skip
        raise CorruptImage(f"{what} has no {OS}/{ARCHITECTURE} image (it has {found or 'none'})")
    matches.sort(key=lambda entry: entry.platform is not None and entry.platform.variant != "")
    return matches[0]


def parse_manifest(data: bytes, what: str) -> ImageManifest:
    try:
        manifest = ImageManifest.model_validate(_load_json(data, what))
    except ValidationError as exc:
        raise CorruptImage(f"{what} is not a valid image manifest: {exc}") from exc
    _check_descriptor(manifest.config, what)
    if manifest.config.media_type not in CONFIG_TYPES:
        raise CorruptImage(
            f"{what} is not a container image: config media type {manifest.config.media_type!r}"
        )
    for layer in manifest.layers:
        _check_descriptor(layer, what)
        if layer.media_type not in LAYER_TYPES:
            raise CorruptImage(f"{what}: unsupported layer media type {layer.media_type!r}")
    return manifest


def parse_config(data: bytes, manifest: ImageManifest, what: str) -> ImageConfigBlob:
    """The image config, checked to be linux/amd64 with one diff id per manifest layer."""
    try:
        config = ImageConfigBlob.model_validate(_load_json(data, what))
    except ValidationError as exc:
        raise CorruptImage(f"{what} is not a valid image config: {exc}") from exc
    if (config.os or OS) != OS or (config.architecture or ARCHITECTURE) != ARCHITECTURE:
        raise CorruptImage(
            f"{what} is a {config.os}/{config.architecture} image, not {OS}/{ARCHITECTURE}"
        )
    if len(config.rootfs.diff_ids) != len(manifest.layers):
        raise CorruptImage(
            f"{what} lists {len(config.rootfs.diff_ids)} diff ids for {len(manifest.layers)} layers"
        )
    for diff_id in config.rootfs.diff_ids:
        if not is_digest(diff_id):
            raise CorruptImage(f"{what} has an invalid diff id {diff_id!r}")
    return config


def _check_descriptor(descriptor: Descriptor, what: str) -> None:
    if not is_digest(descriptor.digest):
        raise CorruptImage(f"{what} has an invalid digest {descriptor.digest!r}")
