"""Registry mirrors from a containerd-style hosts directory, against real registries: a
plain-HTTP loopback mirror in front of an unreachable upstream, fallback to the upstream when
a mirror fails (each failure logged with the endpoint), and capabilities deciding which
endpoint may resolve tags."""

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest

from cri_runtime.images.errors import ImageNotFound, RegistryUnavailable
from cri_runtime.images.hosts import RegistryHosts
from cri_runtime.images.store import ImageStore
from devkit.images import push_image
from devkit.registry import LocalRegistry
from tests.registry import refused_host

Logs = list[MutableMapping[str, Any]]


def store_with_hosts(tmp_path: Path, registry: str, hosts_toml: str) -> ImageStore:
    config_dir = tmp_path / "certs.d"
    (config_dir / registry).mkdir(parents=True)
    (config_dir / registry / "hosts.toml").write_text(hosts_toml)
    return ImageStore(tmp_path / "images", RegistryHosts.load(config_dir))


def failures(logs: Logs) -> list[tuple[str, str]]:
    return [
        (entry["endpoint"], entry["error_type"])
        for entry in logs
        if entry["event"] == "registry endpoint failed"
    ]


def test_loopback_mirror_in_front_of_an_unreachable_upstream(
    tmp_path: Path, oci_registry: LocalRegistry, image_logs: Logs
) -> None:
    digest = push_image(oci_registry, "mirrors/app", "1", [{"f": b"from the mirror"}])
    with refused_host() as upstream:
        store = store_with_hosts(
            tmp_path,
            upstream,
            f'server = "https://{upstream}"\n'
            f'[host."http://{oci_registry.host}"]\n  capabilities = ["pull", "resolve"]\n',
        )
        image = store.pull(f"{upstream}/mirrors/app:1")
    assert image.repo_tags == [f"{upstream}/mirrors/app:1"]  # named as asked, not as mirrored
    assert image.repo_digests == [f"{upstream}/mirrors/app@{digest}"]
    assert (store.layer_dirs(image)[0] / "f").read_bytes() == b"from the mirror"
    assert failures(image_logs) == []


def test_failed_mirror_falls_back_to_the_server(
    tmp_path: Path, oci_registry: LocalRegistry, image_logs: Logs
) -> None:
    push_image(oci_registry, "mirrors/fallback", "1", [{"f": b"from upstream"}])
    with refused_host() as dead_mirror:
        store = store_with_hosts(
            tmp_path,
            oci_registry.host,
            f'[host."http://{dead_mirror}"]\n  capabilities = ["pull", "resolve"]\n',
        )
        image = store.pull(f"{oci_registry.host}/mirrors/fallback:1")
    assert (store.layer_dirs(image)[0] / "f").read_bytes() == b"from upstream"
    # Logged once: an endpoint that did not answer is skipped for the rest of the pull.
    assert failures(image_logs) == [(f"http://{dead_mirror}/v2", "RegistryUnavailable")]


def test_mirror_without_the_image_falls_back(
    tmp_path: Path, oci_registry: LocalRegistry, image_logs: Logs
) -> None:
    push_image(oci_registry, "mirrors/not-mirrored", "1", [{"f": b"only upstream"}])
    empty_mirror = LocalRegistry(tmp_path / "mirror").start()
    try:
        store = store_with_hosts(
            tmp_path, oci_registry.host, f'[host."http://{empty_mirror.host}"]\n'
        )
        image = store.pull(f"{oci_registry.host}/mirrors/not-mirrored:1")
    finally:
        empty_mirror.stop()
    assert (store.layer_dirs(image)[0] / "f").read_bytes() == b"only upstream"
    # Asked for each of manifest, config and layer: a mirror may hold some blobs and not others.
    assert failures(image_logs) == [(f"http://{empty_mirror.host}/v2", "ImageNotFound")] * 3


def test_pull_only_mirror_serves_digests_but_not_tags(
    tmp_path: Path, oci_registry: LocalRegistry, image_logs: Logs
) -> None:
    digest = push_image(oci_registry, "mirrors/pull-only", "1", [{"f": b"pinned"}])
    with refused_host() as upstream:
        store = store_with_hosts(
            tmp_path,
            upstream,
            f'server = "http://{upstream}"\n'
            f'[host."http://{oci_registry.host}"]\n  capabilities = ["pull"]\n',
        )
        with pytest.raises(RegistryUnavailable, match=f"cannot reach {upstream}"):
            store.pull(f"{upstream}/mirrors/pull-only:1")  # tags resolve at the server only
        assert failures(image_logs) == [(f"http://{upstream}/v2", "RegistryUnavailable")]
        image = store.pull(f"{upstream}/mirrors/pull-only@{digest}")
    assert (store.layer_dirs(image)[0] / "f").read_bytes() == b"pinned"


def test_every_endpoint_failing_names_each(tmp_path: Path, image_logs: Logs) -> None:
    with refused_host() as mirror, refused_host() as upstream:
        store = store_with_hosts(
            tmp_path, upstream, f'server = "http://{upstream}"\n[host."http://{mirror}"]\n'
        )
        with pytest.raises(RegistryUnavailable, match=f"cannot reach {upstream}"):
            store.pull(f"{upstream}/app:1")
    assert failures(image_logs) == [
        (f"http://{mirror}/v2", "RegistryUnavailable"),
        (f"http://{upstream}/v2", "RegistryUnavailable"),
    ]


def test_not_found_everywhere_is_image_not_found(
    tmp_path: Path, oci_registry: LocalRegistry, image_logs: Logs
) -> None:
    with refused_host() as mirror:
        store = store_with_hosts(tmp_path, oci_registry.host, f'[host."http://{mirror}"]\n')
        with pytest.raises(ImageNotFound, match=f"registry {oci_registry.host}"):
            store.pull(f"{oci_registry.host}/mirrors/nowhere:1")
    assert [error for _, error in failures(image_logs)] == ["RegistryUnavailable", "ImageNotFound"]
