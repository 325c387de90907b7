"""The image store: pulls images, keeps each layer unpacked once, names images by tag and repo
digest, and deletes layers when the last image or container holding them lets go.

On disk (docs/images.md has the why):

    <root>/index.json        images, layer sizes and holds: the one source of truth, replaced
                             atomically (write tmp, fsync, rename)
    <root>/layers/<hex>/     one unpacked layer per uncompressed digest (diff id), overlay format
    <root>/tmp/              downloads, unpacks and deletions in progress; emptied on open

A layer directory appears by rename once complete and before the index names it, and leaves by
rename after the index stopped naming it, so a kill -9 at any point leaves only leftovers in
tmp/ and unnamed layer directories, both removed when the store is opened again. One process
owns a root at a time.
"""

from __future__ import annotations

import builtins
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cri_runtime.images.auth import RegistryAuth
from cri_runtime.images.digest import hex_of, is_digest
from cri_runtime.images.errors import ImageError, ImageNotFound, InvalidReference
from cri_runtime.images.fsutil import (
    atomic_write,
    discard,
    fsync_dir,
    remove_path,
    syncfs,
    unique_name,
)
from cri_runtime.images.hosts import RegistryHosts
from cri_runtime.images.manifest import (
    INDEX_TYPES,
    MAX_CONFIG_BYTES,
    Descriptor,
    ImageConfigBlob,
    ImageManifest,
    manifest_kind,
    parse_config,
    parse_index,
    parse_manifest,
    select_platform,
)
from cri_runtime.images.reference import Reference
from cri_runtime.images.registry import DEFAULT_TIMEOUT_S, RegistrySession
from cri_runtime.images.unpack import unpack_layer

__all__ = ["FsUsage", "Image", "ImageConfig", "ImageStore", "RegistryAuth"]

log = structlog.get_logger(__name__)

INDEX_FILE = "index.json"
MAX_INDEX_DEPTH = 3  # an index may name an index; more nesting than this is not an image
PARALLEL_LAYERS = 3
_ID_PREFIX = re.compile(r"^[0-9a-f]{12,128}$")


class ImageConfig(BaseModel):
    """The runtime defaults from the image config, for CreateContainer."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    stop_signal: str = ""

    @classmethod
    def from_blob(cls, blob: ImageConfigBlob) -> ImageConfig:
        config = blob.config
        if config is None:
            return cls()
        return cls(
            entrypoint=tuple(config.Entrypoint or ()),
            cmd=tuple(config.Cmd or ()),
            env=tuple(config.Env or ()),
            working_dir=config.WorkingDir or "",
            user=config.User or "",
            labels=config.Labels or {},
            stop_signal=config.StopSignal or "",
        )


class Image(BaseModel):
    id: str  # "sha256:<config digest hex>"
    repo_tags: list[str]  # "registry/repository:tag"
    repo_digests: list[str]  # "registry/repository@sha256:...", the digest the pull resolved
    size: int  # bytes of the unpacked layers on disk
    config: ImageConfig
    layers: list[str]  # uncompressed layer digests (diff ids), lowest first
    pinned: bool = False


class FsUsage(BaseModel):
    mountpoint: Path
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


class LayerRecord(BaseModel):
    size: int
    inodes: int


class Hold(BaseModel):
    """A container's claim on its image's layers; it outlives the image's removal."""

    image_id: str
    layers: list[str]


class StoreIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    images: dict[str, Image] = Field(default_factory=dict)
    layers: dict[str, LayerRecord] = Field(default_factory=dict)
    holds: dict[str, Hold] = Field(default_factory=dict)


class _KeyedLocks:
    """One lock per key (a layer digest), forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}

    @contextmanager
    def locked(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if users[0] == 0:
                    del self._locks[key]


class ImageStore:
    """Thread-safe; every method may be called from any CRI handler thread."""

    def __init__(
        self,
        root: Path,
        hosts: RegistryHosts | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.root = root
        self._hosts = hosts if hosts is not None else RegistryHosts.load(None)
        self._timeout_s = timeout_s
        self._layers_dir = root / "layers"
        self._tmp = root / "tmp"
        self._lock = threading.Lock()  # guards the in-memory index and index.json
        self._layer_locks = _KeyedLocks()
        self._pins: Counter[str] = Counter()  # layers a pull in progress is about to name
        self._images: dict[str, Image] = {}
        self._layers: dict[str, LayerRecord] = {}
        self._holds: dict[str, Hold] = {}
        self._removal_listeners: builtins.list[Callable[[frozenset[str]], None]] = []
        self._open()

    # -- queries ---------------------------------------------------------------------------

    def resolve(self, ref_or_id: str) -> Image | None:
        """The image a tag, repo digest, id ("sha256:<hex>", "<hex>") or unique id prefix
        (at least 12 hex digits) names; None if none does."""
        with self._lock:
            match = self._match(ref_or_id)
            return match[0].model_copy(deep=True) if match else None

    def list(self) -> builtins.list[Image]:
        with self._lock:
            return [image.model_copy(deep=True) for image in self._images.values()]

    def live_ids(self) -> frozenset[str]:
        """The ids of the images present or held by a container."""
        with self._lock:
            return self._live_ids()

    def on_removal(self, listener: Callable[[frozenset[str]], None]) -> None:
        """Call ``listener(live_ids())`` after each removal of an image or a hold, so what was
        derived from images elsewhere (the Xen backend's image disks) follows the store."""
        self._removal_listeners.append(listener)

    def layer_dirs(self, image: Image) -> builtins.list[Path]:
        """Unpacked layer directories, lowest first (overlay wants lowerdirs topmost first).
        A layer an image has twice is listed once, at its top position: overlayfs refuses a
        lowerdir given twice, and the upper copy shadows everything the lower one shows."""
        topmost_first = list(dict.fromkeys(reversed(image.layers)))
        return [self._layer_path(diff_id) for diff_id in reversed(topmost_first)]

    def fs_usage(self) -> FsUsage:
        with self._lock:
            records = list(self._layers.values())
        return FsUsage(
            mountpoint=self.root,
            used_bytes=sum(record.size for record in records),
            inodes_used=sum(record.inodes for record in records),
            timestamp_ns=time.time_ns(),
        )

    # -- pull ------------------------------------------------------------------------------

    def pull(self, ref: str, auth: RegistryAuth | None = None) -> Image:
        """Pull `ref` (linux/amd64) and name it by its tag and repo digest. Pulling again
        re-resolves the tag; a tag that moved is taken from the image it named."""
        reference = Reference.parse(ref)
        if reference.digest:
            with self._lock:
                known = self._match(f"{reference.name}@{reference.digest}")
                if known is not None:  # content pinned by digest and already here
                    return self._name_and_save(known[0], reference, reference.digest)
        session = RegistrySession(
            self._hosts.endpoints(reference.registry), reference, auth, self._timeout_s
        )
        top_digest, body, content_type = session.resolve()
        manifest = self._platform_manifest(session, top_digest, body, content_type)
        config_blob = session.small_blob(manifest.config, MAX_CONFIG_BYTES)
        config = parse_config(config_blob, manifest, f"config of {reference}")
        diff_ids = config.rootfs.diff_ids
        with self._lock:
            self._pins.update(diff_ids)
        try:
            self._fetch_layers(session, manifest.layers, diff_ids)
            with self._lock:
                image = self._images.get(manifest.config.digest)
                if image is None:
                    image = Image(
                        id=manifest.config.digest,
                        repo_tags=[],
                        repo_digests=[],
                        size=sum(self._layers[diff_id].size for diff_id in set(diff_ids)),
                        config=ImageConfig.from_blob(config),
                        layers=list(diff_ids),
                    )
                    self._images[image.id] = image
                pulled = self._name_and_save(image, reference, top_digest)
        finally:
            # Collect even after a commit: a removal while this pull held its pins may have
            # left layers that only the pins kept.
            with self._lock:
                self._pins.subtract(diff_ids)
                self._pins = +self._pins
                doomed = self._save_and_collect() if self._unnamed_layers() else []
            self._delete(doomed)
        log.info("image pulled", ref=str(reference), image=pulled.id, digest=top_digest)
        return pulled

    def _platform_manifest(
        self, session: RegistrySession, digest: str, body: bytes, content_type: str
    ) -> ImageManifest:
        """The linux/amd64 image manifest, following indexes (manifest lists)."""
        what = f"manifest {digest} of {session.reference}"
        for _ in range(MAX_INDEX_DEPTH):
            if manifest_kind(body, content_type, what) not in INDEX_TYPES:
                return parse_manifest(body, what)
            entry = select_platform(parse_index(body, what), what)
            digest = entry.digest
            body, content_type = session.manifest(digest)
            what = f"manifest {digest} of {session.reference}"
        raise ImageError(f"{what}: indexes nested deeper than {MAX_INDEX_DEPTH}")

    def _fetch_layers(
        self,
        session: RegistrySession,
        layers: builtins.list[Descriptor],
        diff_ids: builtins.list[str],
    ) -> None:
        with ThreadPoolExecutor(PARALLEL_LAYERS, thread_name_prefix="layer-pull") as pool:
            futures = [
                pool.submit(self._ensure_layer, session, descriptor, diff_id)
                for descriptor, diff_id in zip(layers, diff_ids, strict=True)
            ]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()  # the pull failed: layers not started yet are not wanted
                raise

    def _ensure_layer(self, session: RegistrySession, descriptor: Descriptor, diff_id: str) -> None:
        """Download, verify and unpack one layer unless it is already on disk. One thread per
        layer at a time; others wait and then find it there."""
        with self._layer_locks.locked(diff_id):
            with self._lock:
                if diff_id in self._layers:
                    return
            blob = self._tmp / unique_name(f"blob-{hex_of(descriptor.digest)}")
            unpacked = self._tmp / unique_name(f"layer-{hex_of(diff_id)}")
            try:
                session.blob_to_file(descriptor, blob)
                unpacked.mkdir(mode=0o755)
                with blob.open("rb") as stream:
                    stats = unpack_layer(stream, unpacked, diff_id)
                syncfs(unpacked)  # the files are on disk before a name points at them
                os.rename(unpacked, self._layer_path(diff_id))
                fsync_dir(self._layers_dir)
            except BaseException:
                remove_path(unpacked)
                raise
            finally:
                blob.unlink(missing_ok=True)
            with self._lock:
                self._layers[diff_id] = LayerRecord(size=stats.size, inodes=stats.inodes)
            log.info(
                "layer unpacked",
                ref=str(session.reference),
                layer=descriptor.digest,
                diff_id=diff_id,
                size=stats.size,
            )

    def _name_and_save(self, image: Image, reference: Reference, digest: str) -> Image:
        """Name `image` by the reference's tag (taken from any other image) and repo digest."""
        if reference.tag:
            tag = f"{reference.name}:{reference.tag}"
            for other in self._images.values():
                if other is not image and tag in other.repo_tags:
                    other.repo_tags.remove(tag)
                    log.info("tag moved", tag=tag, old=other.id, new=image.id)
            if tag not in image.repo_tags:
                image.repo_tags.append(tag)
        repo_digest = f"{reference.name}@{digest}"
        if repo_digest not in image.repo_digests:
            image.repo_digests.append(repo_digest)
        self._save()
        return image.model_copy(deep=True)

    # -- removal and holds -----------------------------------------------------------------

    def remove(self, ref_or_id: str) -> None:
        """By id: the image and every name of it. By tag or repo digest: that name, and the
        image once no tag (nor, for a digest, any name) is left. Unknown refs are no error.
        Layers go when no image and no hold names them."""
        with self._lock:
            match = self._match(ref_or_id)
            if match is None:
                return
            image, name = match
            if name is None:
                unnamed = True
            elif name in image.repo_tags:
                image.repo_tags.remove(name)
                unnamed = not image.repo_tags
            else:
                image.repo_digests.remove(name)
                unnamed = not image.repo_tags and not image.repo_digests
            if unnamed:
                del self._images[image.id]
                log.info("image removed", image=image.id, by=ref_or_id)
            doomed = self._save_and_collect()
            live = self._live_ids()
        self._delete(doomed)
        if unnamed:
            self._removed(live)

    def hold(self, image_id: str, holder: str) -> None:
        """Keep the image's layers on disk for `holder` (a container id) until release, even
        if the image is removed meanwhile; recorded in the index, so it survives a restart."""
        with self._lock:
            match = self._match(image_id)
            if match is None:
                raise ImageNotFound(f"image {image_id} is not in the store")
            self._holds[holder] = Hold(image_id=match[0].id, layers=list(match[0].layers))
            self._save()

    def release(self, holder: str) -> None:
        """Drop `holder`'s hold (unknown holders are no error) and delete layers it kept."""
        with self._lock:
            if self._holds.pop(holder, None) is None:
                return
            doomed = self._save_and_collect()
            live = self._live_ids()
        self._delete(doomed)
        self._removed(live)

    # -- internals (callers hold self._lock unless said otherwise) -------------------------

    def _live_ids(self) -> frozenset[str]:
        return frozenset(self._images) | {hold.image_id for hold in self._holds.values()}

    def _removed(self, live: frozenset[str]) -> None:
        """Tell the removal listeners (without the lock); their failures are only logged."""
        for listener in self._removal_listeners:
            try:
                listener(live)
            except Exception:
                log.exception("image removal listener failed")

    def _match(self, ref_or_id: str) -> tuple[Image, str | None] | None:
        """(image, the name that matched or None for an id)."""
        if is_digest(ref_or_id):
            image = self._images.get(ref_or_id)
            return (image, None) if image else None
        if _ID_PREFIX.match(ref_or_id):
            found = [
                image for image in self._images.values() if hex_of(image.id).startswith(ref_or_id)
            ]
            if len(found) > 1:
                raise InvalidReference(f"image id prefix {ref_or_id} names {len(found)} images")
            if found:
                return found[0], None
        reference = Reference.parse(ref_or_id)
        if reference.digest:
            name = f"{reference.name}@{reference.digest}"
            names = "repo_digests"
        else:
            name = f"{reference.name}:{reference.tag}"
            names = "repo_tags"
        for image in self._images.values():
            if name in getattr(image, names):
                return image, name
        return None

    def _unnamed_layers(self) -> builtins.list[str]:
        """Layers no image, hold or pull in progress names."""
        named = set(self._pins)
        for image in self._images.values():
            named.update(image.layers)
        for hold in self._holds.values():
            named.update(hold.layers)
        return [diff_id for diff_id in self._layers if diff_id not in named]

    def _save_and_collect(self) -> builtins.list[Path]:
        """Forget unnamed layers, save the index, then move their directories into tmp/ and
        return where they went, for `_delete` outside the lock. In this order a crash leaves
        at worst tmp/ leftovers: the index never names a missing layer, and a layer directory
        is never in layers/ while a pull may be unpacking the same layer."""
        doomed = self._unnamed_layers()
        for diff_id in doomed:
            del self._layers[diff_id]
        self._save()
        return [discard(self._layer_path(diff_id), self._tmp) for diff_id in doomed]

    def _delete(self, discarded: builtins.list[Path]) -> None:
        """Delete discarded layer directories; without the lock, as a big layer takes time."""
        for path in discarded:
            remove_path(path)
            log.info("layer deleted", layer=path.name.split("-")[1])

    def _layer_path(self, diff_id: str) -> Path:
        return self._layers_dir / hex_of(diff_id)

    def _save(self) -> None:
        index = StoreIndex(images=self._images, layers=self._layers, holds=self._holds)
        atomic_write(self.root / INDEX_FILE, index.model_dump_json(indent=1).encode(), self._tmp)

    def _open(self) -> None:
        """Load the index and undo what an interrupted process left: tmp/ leftovers, layer
        directories the index does not name, and (only after manual damage) index entries
        whose layers are gone."""
        self._layers_dir.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(exist_ok=True)
        for leftover in self._tmp.iterdir():
            remove_path(leftover)
            log.info("removed leftover of an interrupted operation", path=str(leftover))
        index_path = self.root / INDEX_FILE
        try:
            index = (
                StoreIndex.model_validate_json(index_path.read_bytes())
                if index_path.exists()
                else StoreIndex()
            )
        except ValidationError as exc:
            raise ImageError(f"image store index {index_path} is unreadable: {exc}") from exc
        on_disk = {entry.name for entry in self._layers_dir.iterdir()}
        self._layers = {
            diff_id: record
            for diff_id, record in index.layers.items()
            if hex_of(diff_id) in on_disk
        }
        for image in index.images.values():
            if all(diff_id in self._layers for diff_id in image.layers):
                self._images[image.id] = image
            else:
                log.warning("image dropped: its layers are missing", image=image.id)
        self._holds = index.holds
        named = {hex_of(diff_id) for diff_id in self._layers}
        for orphan in on_disk - named:
            remove_path(discard(self._layers_dir / orphan, self._tmp))
            log.info("removed layer an interrupted pull left", layer=orphan)
        self._delete(self._save_and_collect())
        log.info("image store open", root=str(self.root), images=len(self._images))
