"""The ZoneControl gRPC service (gpu_proxy/proto/control.proto): vgpu-runtime registers and
removes zones here. Served on a unix socket; only root (the runtime) should reach it, which the
socket's directory permissions enforce on a node."""

from concurrent import futures
from typing import Any

import grpc

from gpu_proxy.proto.gen import control_pb2, control_pb2_grpc
from gpu_proxy.registry import InvalidZoneId, ZoneAlreadyRegistered, ZoneRegistry
from gpu_proxy.telemetry.zone_stats import ZoneIdentity


class ZoneControlService:
    def __init__(self, registry: ZoneRegistry, default_limit: int, gpu_index: int) -> None:
        self.registry = registry
        self.default_limit = default_limit
        self.gpu_index = gpu_index

    def Register(
        self, request: control_pb2.RegisterZoneRequest, context: Any
    ) -> control_pb2.RegisterZoneReply:
        ident = request.identity
        identity = ZoneIdentity(
            zone=ident.zone,
            domid=ident.domid,
            pod=ident.pod,
            namespace=ident.namespace,
            container=ident.container,
            pod_uid=ident.pod_uid,
            gpu_index=self.gpu_index,
            gpu_uuid=self.registry.backend.device_info().uuid.hex(),
        )
        limit = request.memory_limit_bytes or self.default_limit
        try:
            path = self.registry.register(identity, limit)
        except ZoneAlreadyRegistered as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except (InvalidZoneId, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return control_pb2.RegisterZoneReply(
            socket_path=str(path), memory_limit_bytes=self.registry.ledger.usage(ident.zone)[1]
        )

    def Remove(
        self, request: control_pb2.RemoveZoneRequest, context: Any
    ) -> control_pb2.RemoveZoneReply:
        return control_pb2.RemoveZoneReply(reclaimed=self.registry.remove(request.zone))

    def List(
        self, request: control_pb2.ListZonesRequest, context: Any
    ) -> control_pb2.ListZonesReply:
        statuses = []
        for zone in self.registry.zones():
            used, limit = zone.memory()
            i = zone.identity
            statuses.append(
                control_pb2.ZoneStatus(
                    identity=control_pb2.ZoneIdentity(
                        zone=i.zone,
                        domid=i.domid,
                        pod=i.pod,
                        namespace=i.namespace,
                        container=i.container,
                        pod_uid=i.pod_uid,
                    ),
                    socket_path=str(self.registry.socket_path(zone.id)),
                    memory_used_bytes=used,
                    memory_limit_bytes=limit,
                    handles=zone.handle_counts(),
                )
            )
        return control_pb2.ListZonesReply(zones=statuses)


def serve_control(service: ZoneControlService, address: str) -> grpc.Server:
    """Start the ZoneControl server on ``address`` (unix:///path or host:port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="control"))
    control_pb2_grpc.add_ZoneControlServicer_to_server(service, server)
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot bind the zone control service to {address}")
    server.start()
    return server
