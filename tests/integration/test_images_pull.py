"""Pulls from a real registry (docker-registry 2.8): by tag and digest, indexes resolved to
linux/amd64, every manifest and layer format, and the error each failure is reported as."""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri_runtime.images.errors import (
    CorruptImage,
    DigestMismatch,
    ImageNotFound,
    InvalidReference,
    RegistryUnavailable,
)
from cri_runtime.images.store import ImageConfig, ImageStore
from cri_runtime.images.unpack import disk_usage
from devkit.busybox import PASSWD
from devkit.images import push_image, push_image_manifest, push_index, sha256, tar_layer
from devkit.registry import LocalRegistry
from tests.registry import refused_host


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


@pytest.fixture
def private_registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    """A registry of the test's own, for tests that damage its storage."""
    local = LocalRegistry(tmp_path / "registry").start()
    yield local
    local.stop()


def test_busybox_image_runs(store: ImageStore, busybox_ref: str) -> None:
    image = store.pull(busybox_ref)
    [layer] = store.layer_dirs(image)
    assert (layer / "etc/passwd").read_text() == PASSWD
    result = subprocess.run(
        ["chroot", str(layer), "/bin/sh", "-c", "echo hello; id -u nobody; printenv PATH"],
        capture_output=True,
        text=True,
        env={"PATH": image.config.env[0].removeprefix("PATH=")},
        check=True,
    )
    assert result.stdout.splitlines() == ["hello", "65534", image.config.env[0][5:]]
    assert image.config.cmd == ("sh",)


def test_pull_by_tag(store: ImageStore, oci_registry: LocalRegistry) -> None:
    pushed = push_image_manifest(
        oci_registry,
        "pull/by-tag",
        "v1",
        [{"etc/os-release": b"ID=test\n"}, {"app/run": b"#!/bin/sh\n"}],
        {
            "Entrypoint": ["/app/run"],
            "Cmd": ["--serve"],
            "Env": ["A=1", "B=2"],
            "WorkingDir": "/app",
            "User": "65534:65534",
            "Labels": {"team": "gpu"},
            "StopSignal": "SIGINT",
        },
    )
    ref = f"{oci_registry.host}/pull/by-tag:v1"
    image = store.pull(ref)
    assert image.id == pushed.config_digest
    assert image.repo_tags == [ref]
    assert image.repo_digests == [f"{oci_registry.host}/pull/by-tag@{pushed.digest}"]
    assert image.layers == list(pushed.diff_ids)
    assert image.config == ImageConfig(
        entrypoint=("/app/run",),
        cmd=("--serve",),
        env=("A=1", "B=2"),
        working_dir="/app",
        user="65534:65534",
        labels={"team": "gpu"},
        stop_signal="SIGINT",
    )
    lower, upper = store.layer_dirs(image)
    assert (lower / "etc/os-release").read_bytes() == b"ID=test\n"
    assert (upper / "app/run").read_bytes() == b"#!/bin/sh\n"
    assert image.size == disk_usage(lower)[0] + disk_usage(upper)[0]
    assert store.pull(ref) == image  # idempotent
    assert store.list() == [image]


def test_pull_by_digest_then_offline(tmp_path: Path, private_registry: LocalRegistry) -> None:
    store = ImageStore(tmp_path / "images")
    digest = push_image(private_registry, "pull/by-digest", "v1", [{"f": b"by digest"}])
    ref = f"{private_registry.host}/pull/by-digest@{digest}"
    image = store.pull(ref)
    assert (image.repo_tags, image.repo_digests) == ([], [ref])
    private_registry.stop()
    # Content named by digest is already here: no registry needed, and a tag can be added.
    again = store.pull(f"{private_registry.host}/pull/by-digest:pinned@{digest}")
    assert again.id == image.id
    assert again.repo_tags == [f"{private_registry.host}/pull/by-digest:pinned"]


@pytest.mark.parametrize("oci", [True, False], ids=["oci-index", "docker-manifest-list"])
def test_index_resolves_to_linux_amd64(
    store: ImageStore, oci_registry: LocalRegistry, oci: bool
) -> None:
    repo = f"pull/multiarch-{'oci' if oci else 'docker'}"
    arm = push_image_manifest(
        oci_registry, repo, None, [{"arch": b"arm64"}], architecture="arm64", oci=oci
    )
    amd = push_image_manifest(oci_registry, repo, None, [{"arch": b"amd64"}], oci=oci)
    index_digest = push_index(
        oci_registry, repo, "1", [(arm, "linux/arm64"), (amd, "linux/amd64")], oci=oci
    )
    image = store.pull(f"{oci_registry.host}/{repo}:1")
    assert image.id == amd.config_digest
    assert image.repo_digests == [f"{oci_registry.host}/{repo}@{index_digest}"]
    [layer] = store.layer_dirs(image)
    assert (layer / "arch").read_bytes() == b"amd64"


def test_index_without_amd64_is_corrupt(store: ImageStore, oci_registry: LocalRegistry) -> None:
    arm = push_image_manifest(
        oci_registry, "pull/arm-only", None, [{"a": b"arm"}], architecture="arm64"
    )
    push_index(oci_registry, "pull/arm-only", "1", [(arm, "linux/arm64")])
    with pytest.raises(CorruptImage, match=r"no linux/amd64 image.*linux/arm64"):
        store.pull(f"{oci_registry.host}/pull/arm-only:1")
    push_image(oci_registry, "pull/arm-only", "single", [{"a": b"arm"}], architecture="arm64")
    with pytest.raises(CorruptImage, match="linux/arm64 image, not linux/amd64"):
        store.pull(f"{oci_registry.host}/pull/arm-only:single")
    assert store.list() == []


@pytest.mark.parametrize(
    ("compression", "oci"),
    [("gzip", False), ("gzip", True), ("zstd", True), ("none", True)],
)
def test_layer_formats(
    store: ImageStore, oci_registry: LocalRegistry, compression: str, oci: bool
) -> None:
    tar = tar_layer({"data/file": f"{compression} {oci}".encode()})
    repo = f"pull/format-{compression}-{'oci' if oci else 'docker'}"
    push_image(oci_registry, repo, "1", [tar], compression=compression, oci=oci)
    image = store.pull(f"{oci_registry.host}/{repo}:1")
    assert image.layers == [sha256(tar)]
    [layer] = store.layer_dirs(image)
    assert (layer / "data/file").read_bytes() == f"{compression} {oci}".encode()


def test_moved_tag_is_retagged(store: ImageStore, oci_registry: LocalRegistry) -> None:
    ref = f"{oci_registry.host}/pull/moving:latest"
    first = store.pull(push_ref(oci_registry, "pull/moving", b"first"))
    second = store.pull(push_ref(oci_registry, "pull/moving", b"second"))
    assert first.id != second.id
    assert second.repo_tags == [ref]
    old = store.resolve(first.id)
    assert old is not None and old.repo_tags == [] and old.repo_digests == first.repo_digests
    assert store.resolve(ref) == second


def push_ref(registry: LocalRegistry, repo: str, content: bytes) -> str:
    push_image(registry, repo, "latest", [{"content": content}])
    return f"{registry.host}/{repo}"


def test_resolve_by_every_name(store: ImageStore, oci_registry: LocalRegistry) -> None:
    image = store.pull(push_ref(oci_registry, "pull/names", b"names"))
    hex_id = image.id.removeprefix("sha256:")
    for name in [
        f"{oci_registry.host}/pull/names",
        f"{oci_registry.host}/pull/names:latest",
        image.repo_digests[0],
        image.id,
        hex_id,
        hex_id[:12],
    ]:
        assert store.resolve(name) == image, name
    assert store.resolve(hex_id[:11]) is None  # too short for an id: a docker.io name
    assert store.resolve(f"{oci_registry.host}/pull/names:other") is None
    with pytest.raises(InvalidReference):
        store.resolve("lower/Upper")


def test_missing_tag_and_repository(store: ImageStore, oci_registry: LocalRegistry) -> None:
    push_image(oci_registry, "pull/exists", "1", [{"f": b"exists"}])
    for ref in [f"{oci_registry.host}/pull/exists:2", f"{oci_registry.host}/pull/never-pushed:1"]:
        with pytest.raises(ImageNotFound) as info:
            store.pull(ref)
        assert ref in str(info.value) and f"registry {oci_registry.host}" in str(info.value)
    assert store.list() == []


def test_registry_down(store: ImageStore) -> None:
    with refused_host() as host, pytest.raises(RegistryUnavailable, match=f"cannot reach {host}"):
        store.pull(f"{host}/app:1")


def test_tampered_layer_is_a_digest_mismatch(
    tmp_path: Path, private_registry: LocalRegistry
) -> None:
    store = ImageStore(tmp_path / "images")
    pushed = push_image_manifest(private_registry, "pull/tampered", "1", [{"f": os.urandom(4096)}])
    flip_a_byte(private_registry.blob_file(pushed.layer_digests[0]))
    with pytest.raises(DigestMismatch) as info:
        store.pull(f"{private_registry.host}/pull/tampered:1")
    assert info.value.expected == pushed.layer_digests[0]
    assert info.value.actual != info.value.expected
    assert store.list() == []
    assert sorted(p.name for p in store.root.iterdir()) == ["index.json", "layers", "tmp"]
    assert list((store.root / "layers").iterdir()) == list((store.root / "tmp").iterdir()) == []


def test_tampered_manifest_is_a_digest_mismatch(
    store: ImageStore, private_registry: LocalRegistry
) -> None:
    pushed = push_image_manifest(private_registry, "pull/tampered-manifest", "1", [{"f": b"m"}])
    manifest_file = private_registry.blob_file(pushed.digest)
    manifest_file.write_bytes(manifest_file.read_bytes().replace(b", ", b",\t", 1))  # valid JSON
    with pytest.raises(DigestMismatch) as info:
        store.pull(f"{private_registry.host}/pull/tampered-manifest@{pushed.digest}")
    assert info.value.expected == pushed.digest
    with pytest.raises(DigestMismatch):  # by tag: the registry's Docker-Content-Digest disagrees
        store.pull(f"{private_registry.host}/pull/tampered-manifest:1")


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_repeated_layer_is_stacked_once_at_its_top(
    store: ImageStore, oci_registry: LocalRegistry
) -> None:
    twice = tar_layer({"etc/config": b"from the repeated layer"})
    between = tar_layer({"etc/config": b"overwritten", "etc/extra": b"extra"})
    push_image(oci_registry, "pull/repeated", "1", [twice, between, twice])
    image = store.pull(f"{oci_registry.host}/pull/repeated:1")
    assert image.layers == [sha256(twice), sha256(between), sha256(twice)]
    dirs = store.layer_dirs(image)
    assert [path.name for path in dirs] == [sha256(between)[7:], sha256(twice)[7:]]
    merged = store.root.parent / "merged"
    merged.mkdir()
    lowerdirs = ":".join(str(path) for path in reversed(dirs))
    mount = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowerdirs}", str(merged)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"overlay mount not permitted here: {mount.stderr.strip()}")
    try:
        assert (merged / "etc/config").read_bytes() == b"from the repeated layer"
        assert (merged / "etc/extra").read_bytes() == b"extra"
    finally:
        subprocess.run(["umount", str(merged)], check=True)
