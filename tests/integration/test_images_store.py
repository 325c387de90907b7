"""The store's bookkeeping against a real registry: layers shared between images are kept once
and deleted with the last image or container holding them, holds survive a restart, a pull
killed with SIGKILL at any step leaves a store that opens clean, and concurrent pulls share
work instead of racing."""

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cri_runtime.images.errors import ImageNotFound
from cri_runtime.images.store import Image, ImageStore
from cri_runtime.images.unpack import disk_usage
from devkit.images import PushedManifest, push_image, push_image_manifest
from devkit.registry import LocalRegistry

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def push_pair(registry: LocalRegistry, repo: str) -> tuple[PushedManifest, PushedManifest]:
    """Two images over one shared base layer, each with a layer of its own."""
    base = {"base/lib": f"shared by {repo}".encode()}
    first = push_image_manifest(registry, repo, "a", [base, {"only/a": f"a of {repo}".encode()}])
    second = push_image_manifest(registry, repo, "b", [base, {"only/b": f"b of {repo}".encode()}])
    assert first.layer_digests[0] == second.layer_digests[0]
    return first, second


def layer_names(store: ImageStore) -> set[str]:
    return {path.name for path in (store.root / "layers").iterdir()}


def hexes(*diff_ids: str) -> set[str]:
    return {diff_id.removeprefix("sha256:") for diff_id in diff_ids}


def test_shared_layers_go_with_the_last_image(
    store: ImageStore, oci_registry: LocalRegistry
) -> None:
    first, second = push_pair(oci_registry, "store/shared")
    image_a = store.pull(f"{oci_registry.host}/store/shared:a")
    image_b = store.pull(f"{oci_registry.host}/store/shared:b")
    base, only_a, only_b = first.diff_ids[0], first.diff_ids[1], second.diff_ids[1]
    assert store.layer_dirs(image_a)[0] == store.layer_dirs(image_b)[0]
    assert layer_names(store) == hexes(base, only_a, only_b)
    usage = store.fs_usage()
    on_disk = [disk_usage(store.root / "layers" / name) for name in layer_names(store)]
    assert usage.used_bytes == sum(size for size, _ in on_disk)
    assert usage.inodes_used == sum(inodes for _, inodes in on_disk)
    assert usage.mountpoint == store.root

    store.remove(image_a.id)
    assert layer_names(store) == hexes(base, only_b)
    assert store.resolve(f"{oci_registry.host}/store/shared:a") is None
    assert (store.layer_dirs(image_b)[0] / "base/lib").exists()

    store.remove(f"{oci_registry.host}/store/shared:b")
    assert layer_names(store) == set()
    assert store.list() == []
    assert store.fs_usage().used_bytes == 0
    store.remove(image_b.id)  # unknown by now: no error


def test_removal_by_name_keeps_the_image_while_a_tag_names_it(
    store: ImageStore, oci_registry: LocalRegistry
) -> None:
    digest = push_image(oci_registry, "store/names", "one", [{"f": b"names"}])
    push_image(oci_registry, "store/names", "two", [{"f": b"names"}])
    one, two = f"{oci_registry.host}/store/names:one", f"{oci_registry.host}/store/names:two"
    store.pull(one)
    image = store.pull(two)
    assert image.repo_tags == [one, two]
    assert image.repo_digests == [f"{oci_registry.host}/store/names@{digest}"]
    store.remove(one)
    kept = store.resolve(two)
    assert kept is not None and kept.repo_tags == [two]
    assert store.layer_dirs(kept)[0].is_dir()
    store.remove(two)  # the last tag: the image goes, repo digest and layers with it
    assert store.list() == [] and layer_names(store) == set()

    by_digest = store.pull(f"{oci_registry.host}/store/names@{digest}")
    store.remove(f"{oci_registry.host}/store/names@{digest}")
    assert store.resolve(by_digest.id) is None


def test_holds_keep_layers_across_removal_and_restart(
    tmp_path: Path, store: ImageStore, oci_registry: LocalRegistry
) -> None:
    first, _ = push_pair(oci_registry, "store/held")
    image = store.pull(f"{oci_registry.host}/store/held:a")
    store.hold(image.id, "container-1")
    store.hold(image.id[7:19], "container-2")  # by id prefix
    store.remove(image.id)
    assert store.list() == []
    assert layer_names(store) == hexes(*first.diff_ids)

    reopened = ImageStore(store.root)  # a runtime restart
    assert layer_names(reopened) == hexes(*first.diff_ids)
    assert (reopened.layer_dirs(image)[1] / "only/a").read_bytes() == b"a of store/held"
    reopened.release("container-1")
    assert layer_names(reopened) == hexes(*first.diff_ids)
    reopened.release("container-2")
    reopened.release("container-2")  # unknown holder: no error
    assert layer_names(reopened) == set()
    with pytest.raises(ImageNotFound, match="not in the store"):
        reopened.hold(image.id, "container-3")


def test_held_layers_shared_with_a_new_pull(store: ImageStore, oci_registry: LocalRegistry) -> None:
    push_pair(oci_registry, "store/held-shared")
    image_a = store.pull(f"{oci_registry.host}/store/held-shared:a")
    store.hold(image_a.id, "c1")
    store.remove(image_a.id)
    image_b = store.pull(f"{oci_registry.host}/store/held-shared:b")
    store.release("c1")
    assert layer_names(store) == hexes(*image_b.layers)
    assert all(path.is_dir() for path in store.layer_dirs(image_b))


# The pull runs in a child that SIGKILLs itself at the nth call of one of the store's steps.
KILLER = """
import os, signal, sys
from pathlib import Path
from cri_runtime.images import store
root, ref, step, nth = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
real, calls = getattr(store, step), []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(store, step, dying)
store.ImageStore(root).pull(ref)
"""


@pytest.mark.parametrize(
    ("step", "nth", "leftover"),
    [
        ("unpack_layer", 1, "tmp"),  # blob downloaded, nothing unpacked yet
        ("syncfs", 1, "tmp"),  # layer unpacked in tmp/, not yet renamed
        ("fsync_dir", 1, "layers"),  # layer renamed into layers/, index not written
        ("atomic_write", 2, "layers"),  # every layer in place, the commit never written
    ],
)
def test_kill_9_mid_pull_leaves_a_consistent_store(
    store: ImageStore, oci_registry: LocalRegistry, step: str, nth: int, leftover: str
) -> None:
    push_pair(oci_registry, "store/killed")
    kept = store.pull(f"{oci_registry.host}/store/killed:a")
    ref = f"{oci_registry.host}/store/killed:b"
    child = subprocess.run(
        [sys.executable, "-c", KILLER, str(store.root), ref, step, str(nth)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    if leftover == "tmp":
        assert list((store.root / "tmp").iterdir())
    else:
        assert len(layer_names(store)) == 3  # the new layer, which the index does not name

    reopened = ImageStore(store.root)
    assert list((reopened.root / "tmp").iterdir()) == []
    assert reopened.list() == [kept]
    assert layer_names(reopened) == hexes(*kept.layers)
    pulled = reopened.pull(ref)
    assert (reopened.layer_dirs(pulled)[1] / "only/b").read_bytes() == b"b of store/killed"


def test_concurrent_pulls_download_each_layer_once(
    store: ImageStore, oci_registry: LocalRegistry
) -> None:
    first, second = push_pair(oci_registry, "store/concurrent")
    refs = [f"{oci_registry.host}/store/concurrent:{tag}" for tag in "ab"] * 8
    with ThreadPoolExecutor(len(refs)) as pool:
        images: list[Image] = list(pool.map(store.pull, refs))
    assert {image.id for image in images} == {first.config_digest, second.config_digest}
    for digest in {*first.layer_digests, *second.layer_digests}:
        assert oci_registry.blob_downloads(digest) == 1, digest
    assert layer_names(store) == hexes(*first.diff_ids, *second.diff_ids)
    assert list((store.root / "tmp").iterdir()) == []
    assert sorted(tag for image in store.list() for tag in image.repo_tags) == sorted(set(refs))


def test_concurrent_pulls_and_removals_keep_the_index_true(
    store: ImageStore, oci_registry: LocalRegistry
) -> None:
    """Removing one image while another sharing its base layer is being pulled must not delete
    the layer under the pull (pulls pin their layers until they commit)."""
    push_pair(oci_registry, "store/racing")
    ref_a, ref_b = (f"{oci_registry.host}/store/racing:{tag}" for tag in "ab")

    def churn(round_: int) -> None:
        if round_ % 2:
            store.pull(ref_a)
            store.remove(ref_a)
        else:
            store.pull(ref_b)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(churn, range(40)))
    image_b = store.resolve(ref_b)
    assert image_b is not None and store.resolve(ref_a) is None
    assert layer_names(store) == hexes(*image_b.layers)
    assert all((path / "base/lib").exists() or (path / "only/b").exists()
               for path in store.layer_dirs(image_b))  # fmt: skip
    assert ImageStore(store.root).list() == [image_b]
