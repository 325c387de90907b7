"""The runtime's client of gpu-proxy's ZoneControl service: a GPU pod's zone is registered
(context + quota) before the zone boots and removed when the pod goes."""

from __future__ import annotations

import grpc
import structlog

from cri_runtime.errors import InvalidArgument, Unavailable
from gpu_proxy.proto.gen import control_pb2, control_pb2_grpc

log = structlog.stdlib.get_logger(__name__)

_UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
          "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}  # fmt: skip


def parse_quantity(text: str) -> int:
    """A Kubernetes-style byte quantity ("4Gi", "512Mi", "1000000") as bytes."""
    value = text.strip()
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if suffix and value.endswith(suffix):
            number = value[: -len(suffix)]
            break
    else:
        number, suffix = value, ""
    if not number.isdigit() or int(number) <= 0:
        raise InvalidArgument(f"GPU memory quantity {text!r}: expected e.g. 4Gi, 512Mi or bytes")
    return int(number) * _UNITS[suffix]


class GpuProxyClient:
    """Register/remove zones with gpu-proxy; every failure names the address and the reason."""

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        self.address = address
        self._timeout = timeout_s
        self._channel = grpc.insecure_channel(address)
        self._stub = control_pb2_grpc.ZoneControlStub(self._channel)

    def register(
        self, zone: str, *, pod: str, namespace: str, pod_uid: str, memory_limit: int
    ) -> tuple[str, int]:
        """Returns the zone's socket path and the quota in force. A zone left registered by
        a crashed runtime is removed and registered again."""
        request = control_pb2.RegisterZoneRequest(
            identity=control_pb2.ZoneIdentity(
                zone=zone, pod=pod, namespace=namespace, pod_uid=pod_uid
            ),
            memory_limit_bytes=memory_limit,
        )
        try:
            try:
                reply = self._stub.Register(request, timeout=self._timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                log.warning("zone still registered with gpu-proxy; re-registering", zone=zone)
                self._stub.Remove(control_pb2.RemoveZoneRequest(zone=zone), timeout=self._timeout)
                reply = self._stub.Register(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise self._error("register", zone, exc) from exc
        return reply.socket_path, reply.memory_limit_bytes

    def remove(self, zone: str) -> dict[str, int]:
        try:
            reply = self._stub.Remove(
                control_pb2.RemoveZoneRequest(zone=zone), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise self._error("remove", zone, exc) from exc
        return dict(reply.reclaimed)

    def zones(self) -> list[str]:
        try:
            reply = self._stub.List(control_pb2.ListZonesRequest(), timeout=self._timeout)
        except grpc.RpcError as exc:
            raise self._error("list", "", exc) from exc
        return [z.identity.zone for z in reply.zones]

    def _error(self, what: str, zone: str, exc: grpc.RpcError) -> Exception:
        detail = exc.details() or str(exc.code())
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(f"gpu-proxy refused to {what} zone {zone}: {detail}")
        return Unavailable(f"gpu-proxy at {self.address} could not {what} zone {zone}: {detail}")

    def close(self) -> None:
        self._channel.close()
