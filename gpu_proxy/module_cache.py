"""Module images gpu-proxy has loaded, by SHA-256, so that a zone sends each image once.

cudart loads every fatbin of a program in every process (PyTorch's run to hundreds of MB), and
a zone runs the same program over and over. libvgpu first asks `vgpuModuleLoadCached` with the
image's digest and sends the image only when gpu-proxy answers that it does not have it.

A zone is answered only from images *it* sent: a digest another zone's upload would match stays
a miss, so a zone cannot learn which programs its neighbours run. The bytes are stored once
however many zones sent them (nodes run the same images in many pods), bounded in total and
evicted least recently used; an evicted image is simply sent again. The digest gpu-proxy keys
by is its own hash of the bytes it received, never the one the zone names.
"""

import hashlib
import threading
from collections import OrderedDict

import structlog

log = structlog.get_logger(__name__)

DEFAULT_MODULE_CACHE_BYTES = 1 << 30


def image_digest(image: bytes) -> bytes:
    return hashlib.sha256(image).digest()


class ModuleImageCache:
    def __init__(self, capacity: int) -> None:
        """``capacity``: bytes of images kept for all zones together (0: none)."""
        self.capacity = capacity
        self._images: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._sent_by: dict[str, set[bytes]] = {}
        self._lock = threading.Lock()

    def put(self, zone: str, image: bytes) -> None:
        """Remember that ``zone`` sent ``image`` (which loaded)."""
        if len(image) > self.capacity:
            return
        digest = image_digest(image)
        with self._lock:
            self._sent_by.setdefault(zone, set()).add(digest)
            if digest in self._images:
                self._images.move_to_end(digest)
                return
            self._images[digest] = image
            self._bytes += len(image)
            while self._bytes > self.capacity:
                _, evicted = self._images.popitem(last=False)
                self._bytes -= len(evicted)
        log.debug("module image cached", zone=zone, digest=digest.hex()[:16], bytes=len(image))

    def get(self, zone: str, digest: bytes) -> bytes | None:
        """The image with this digest if ``zone`` sent it and it is still kept."""
        with self._lock:
            if digest not in self._sent_by.get(zone, ()):
                return None
            image = self._images.get(digest)
            if image is not None:
                self._images.move_to_end(digest)
            return image

    def forget_zone(self, zone: str) -> None:
        """The zone is gone: its digests no longer answer. Bytes other zones sent stay; the
        rest age out."""
        with self._lock:
            self._sent_by.pop(zone, None)

    def usage(self) -> tuple[int, int]:
        """(images, bytes) kept."""
        with self._lock:
            return len(self._images), self._bytes
