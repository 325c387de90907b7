"""The CRI v1 ImageService over the ImageStore."""

from __future__ import annotations

import json
from typing import Any

import structlog

from cri_runtime.cri.gen import api_pb2, api_pb2_grpc
from cri_runtime.errors import InvalidArgument
from cri_runtime.images.store import Image, ImageStore, RegistryAuth
from cri_runtime.runtime_service import cri_call

log = structlog.stdlib.get_logger(__name__)


def image_message(image: Image) -> api_pb2.Image:
    user = image.config.user.partition(":")[0]
    return api_pb2.Image(
        id=image.id,
        repo_tags=image.repo_tags,
        repo_digests=image.repo_digests,
        size=image.size,
        uid=api_pb2.Int64Value(value=int(user)) if user.isdigit() else None,
        username="" if user.isdigit() else user,
        spec=api_pb2.ImageSpec(image=image.id),
        pinned=image.pinned,
    )


class ImageService(api_pb2_grpc.ImageServiceServicer):
    def __init__(self, store: ImageStore) -> None:
        self.store = store

    @cri_call
    def ListImages(
        self, request: api_pb2.ListImagesRequest, context: Any
    ) -> api_pb2.ListImagesResponse:
        wanted = request.filter.image.image
        if wanted:
            found = self.store.resolve(wanted)
            images = [found] if found is not None else []
        else:
            images = self.store.list()
        return api_pb2.ListImagesResponse(images=[image_message(i) for i in images])

    @cri_call
    def ImageStatus(
        self, request: api_pb2.ImageStatusRequest, context: Any
    ) -> api_pb2.ImageStatusResponse:
        if not request.image.image:
            raise InvalidArgument("ImageStatus needs an image reference or id")
        image = self.store.resolve(request.image.image)
        if image is None:
            return api_pb2.ImageStatusResponse()
        info = {}
        if request.verbose:
            info["info"] = json.dumps(
                {"config": image.config.model_dump(mode="json"), "layers": image.layers}
            )
        return api_pb2.ImageStatusResponse(image=image_message(image), info=info)

    @cri_call
    def PullImage(
        self, request: api_pb2.PullImageRequest, context: Any
    ) -> api_pb2.PullImageResponse:
        if not request.image.image:
            raise InvalidArgument("PullImage needs an image reference")
        a = request.auth
        auth = None
        if request.HasField("auth"):
            auth = RegistryAuth(
                username=a.username,
                password=a.password,
                auth=a.auth,
                identity_token=a.identity_token,
                registry_token=a.registry_token,
            )
        image = self.store.pull(request.image.image, auth)
        log.info("image pulled", ref=request.image.image, id=image.id, size=image.size)
        return api_pb2.PullImageResponse(image_ref=image.id)

    @cri_call
    def RemoveImage(
        self, request: api_pb2.RemoveImageRequest, context: Any
    ) -> api_pb2.RemoveImageResponse:
        if not request.image.image:
            raise InvalidArgument("RemoveImage needs an image reference or id")
        self.store.remove(request.image.image)
        return api_pb2.RemoveImageResponse()

    @cri_call
    def ImageFsInfo(
        self, request: api_pb2.ImageFsInfoRequest, context: Any
    ) -> api_pb2.ImageFsInfoResponse:
        usage = self.store.fs_usage()
        fs = api_pb2.FilesystemUsage(
            timestamp=usage.timestamp_ns,
            fs_id=api_pb2.FilesystemIdentifier(mountpoint=str(usage.mountpoint)),
            used_bytes=api_pb2.UInt64Value(value=usage.used_bytes),
            inodes_used=api_pb2.UInt64Value(value=usage.inodes_used),
        )
        return api_pb2.ImageFsInfoResponse(image_filesystems=[fs], container_filesystems=[fs])
