"""CRI conformance: the ImageService against a real registry."""

from __future__ import annotations

import grpc
import pytest

from cri_runtime.client import CriClient
from cri_runtime.cri.gen import api_pb2


def spec(ref: str) -> api_pb2.ImageSpec:
    return api_pb2.ImageSpec(image=ref)


def test_pull_list_status_remove(cri: CriClient, busybox_ref: str) -> None:
    image_id = cri.pull(busybox_ref)
    assert image_id.startswith("sha256:") and len(image_id) == 71
    listed = cri.images.ListImages(api_pb2.ListImagesRequest()).images
    mine = [i for i in listed if i.id == image_id]
    assert mine and busybox_ref in mine[0].repo_tags and mine[0].size > 0
    assert mine[0].repo_digests and mine[0].repo_digests[0].split("@")[1].startswith("sha256:")
    filtered = cri.images.ListImages(
        api_pb2.ListImagesRequest(filter=api_pb2.ImageFilter(image=spec(busybox_ref)))
    ).images
    assert [i.id for i in filtered] == [image_id]
    for name in (busybox_ref, image_id, mine[0].repo_digests[0]):
        status = cri.images.ImageStatus(api_pb2.ImageStatusRequest(image=spec(name), verbose=True))
        assert status.image.id == image_id, name
    assert "layers" in status.info["info"]
    fs = cri.images.ImageFsInfo(api_pb2.ImageFsInfoRequest())
    assert fs.image_filesystems[0].used_bytes.value > 0
    assert fs.image_filesystems[0].fs_id.mountpoint

    cri.images.RemoveImage(api_pb2.RemoveImageRequest(image=spec(image_id)))
    absent = cri.images.ImageStatus(api_pb2.ImageStatusRequest(image=spec(busybox_ref)))
    assert not absent.HasField("image")
    cri.images.RemoveImage(api_pb2.RemoveImageRequest(image=spec(image_id)))  # idempotent
    assert cri.pull(busybox_ref) == image_id  # and pullable again


def test_pull_errors(cri: CriClient, busybox_ref: str) -> None:
    registry = busybox_ref.split("/")[0]
    cases = [
        ("UPPER/Case:bad tag", grpc.StatusCode.INVALID_ARGUMENT),
        (f"{registry}/test/no-such-image:1", grpc.StatusCode.NOT_FOUND),
        ("127.0.0.1:1/test/busybox:1", grpc.StatusCode.UNAVAILABLE),
    ]
    for ref, code in cases:
        with pytest.raises(grpc.RpcError) as info:
            cri.pull(ref)
        assert info.value.code() == code, (ref, info.value.details())
        assert info.value.details()
