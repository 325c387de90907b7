"""Manifest, index and config parsing: the supported media types, linux/amd64 selection, and a
CorruptImage that says what is wrong for anything else."""

import json
from typing import Any

import pytest

from cri_runtime.images.digest import Hasher, check_digest, digest_of
from cri_runtime.images.errors import CorruptImage, DigestMismatch, InvalidReference
from cri_runtime.images.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    manifest_kind,
    parse_config,
    parse_index,
    parse_manifest,
    select_platform,
)

D1, D2, D3 = (f"sha256:{c * 64}" for c in "123")
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def dumps(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def manifest(config_type: str = OCI_CONFIG, layer_type: str = GZIP_LAYER) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": D1, "size": 10},
        "layers": [{"mediaType": layer_type, "digest": D2, "size": 20}],
    }


def index_entry(digest: str, platform: str, variant: str = "") -> dict[str, Any]:
    os_, arch = platform.split("/")
    return {
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": 1,
        "platform": {"os": os_, "architecture": arch, **({"variant": variant} if variant else {})},
    }


@pytest.mark.parametrize(
    ("document", "content_type", "kind"),
    [
        ({"mediaType": DOCKER_MANIFEST, "config": {}, "layers": []}, "", DOCKER_MANIFEST),
        ({"mediaType": DOCKER_MANIFEST_LIST, "manifests": []}, "", DOCKER_MANIFEST_LIST),
        ({"config": {}, "layers": []}, f"{OCI_MANIFEST}; charset=utf-8", OCI_MANIFEST),
        ({"manifests": []}, "application/json", OCI_INDEX),
        ({"config": {}, "layers": []}, "application/json", OCI_MANIFEST),
    ],
)
def test_manifest_kind(document: dict[str, Any], content_type: str, kind: str) -> None:
    assert manifest_kind(dumps(document), content_type, "m") == kind


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (dumps({"schemaVersion": 1, "fsLayers": []}), "unsupported media type"),
        (
            dumps({"mediaType": "application/vnd.docker.distribution.manifest.v1+prettyjws"}),
            "unsupported media type",
        ),
    ],
)
def test_unusable_manifests_are_corrupt(data: bytes, reason: str) -> None:
    with pytest.raises(CorruptImage, match=reason):
        manifest_kind(data, "", "manifest x")


def test_select_platform_prefers_plain_linux_amd64() -> None:
    index = parse_index(
        dumps(
            {
                "manifests": [
                    index_entry(D1, "linux/arm64", "v8"),
                    index_entry(D2, "linux/amd64", "v3"),
                    index_entry(D3, "linux/amd64"),
                    index_entry(D1, "unknown/unknown"),
                ]
            }
        ),
        "index",
    )
    assert select_platform(index, "index").digest == D3


def test_index_without_linux_amd64_names_what_it_has() -> None:
    index = parse_index(
        dumps({"manifests": [index_entry(D1, "linux/arm64"), index_entry(D2, "windows/amd64")]}),
        "index of x",
    )
    with pytest.raises(CorruptImage, match=r"no linux/amd64 image.*linux/arm64.*windows/amd64"):
        select_platform(index, "index of x")


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (manifest(config_type="application/vnd.example.artifact+json"), "not a container image"),
        (manifest(layer_type="application/vnd.example.blob"), "unsupported layer media type"),
        ({**manifest(), "config": {"mediaType": OCI_CONFIG, "digest": "sha256:12", "size": 1}},
         "invalid digest"),
        ({**manifest(), "layers": None}, "not a valid image manifest"),
        ({**manifest(), "config": {"mediaType": OCI_CONFIG, "digest": D1, "size": -1}},
         "not a valid image manifest"),
    ],
)  # fmt: skip
def test_bad_manifests_are_corrupt(document: dict[str, Any], reason: str) -> None:
    with pytest.raises(CorruptImage, match=reason):
        parse_manifest(dumps(document), "manifest")


def test_bad_index_entries_are_corrupt() -> None:
    with pytest.raises(CorruptImage, match="invalid digest"):
        parse_index(dumps({"manifests": [index_entry("sha256:zz", "linux/amd64")]}), "index")
    with pytest.raises(CorruptImage, match="not a valid image index"):
        parse_index(dumps({"manifests": [{"digest": D1}]}), "index")


def config(**fields: Any) -> bytes:
    return dumps({"os": "linux", "architecture": "amd64", "rootfs": {"diff_ids": [D3]}, **fields})


def test_config_is_parsed() -> None:
    parsed = parse_config(
        config(config={"Cmd": ["sh"], "Entrypoint": None, "Labels": {"a": "b"}}),
        parse_manifest(dumps(manifest()), "m"),
        "config",
    )
    assert parsed.rootfs.diff_ids == [D3]
    assert parsed.config is not None
    assert (parsed.config.Cmd, parsed.config.Entrypoint) == (["sh"], None)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (config(architecture="arm64"), "linux/arm64 image, not linux/amd64"),
        (config(os="windows"), "windows/amd64 image"),
        (config(rootfs={"diff_ids": [D3, D3]}), "2 diff ids for 1 layers"),
        (config(rootfs={"diff_ids": ["sha256:x"]}), "invalid diff id"),
        (config(rootfs={}), "not a valid image config"),
        (b"null", "not a JSON object"),
    ],
)
def test_bad_configs_are_corrupt(data: bytes, reason: str) -> None:
    with pytest.raises(CorruptImage, match=reason):
        parse_config(data, parse_manifest(dumps(manifest()), "m"), "config")


def test_digest_verification() -> None:
    hasher = Hasher.for_digest(digest_of(b"abc"))
    hasher.update(b"abc")
    hasher.verify("blob", digest_of(b"abc"))
    hasher.update(b"d")
    with pytest.raises(DigestMismatch) as info:
        hasher.verify("blob x", digest_of(b"abc"))
    assert info.value.expected == digest_of(b"abc")
    assert info.value.actual == digest_of(b"abcd")
    assert (
        str(info.value) == f"blob x: expected digest {digest_of(b'abc')}, got {digest_of(b'abcd')}"
    )
    sha512 = digest_of(b"abc", "sha512")
    assert check_digest(sha512) == sha512
    with pytest.raises(InvalidReference):
        Hasher.for_digest("sha1:" + "a" * 40)
