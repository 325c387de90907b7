from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ZoneIdentity(_message.Message):
    __slots__ = ("zone", "domid", "pod", "namespace", "container", "pod_uid")
    ZONE_FIELD_NUMBER: _ClassVar[int]
    DOMID_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    zone: str
    domid: int
    pod: str
    namespace: str
    container: str
    pod_uid: str
    def __init__(self, zone: _Optional[str] = ..., domid: _Optional[int] = ..., pod: _Optional[str] = ..., namespace: _Optional[str] = ..., container: _Optional[str] = ..., pod_uid: _Optional[str] = ...) -> None: ...

class RegisterZoneRequest(_message.Message):
    __slots__ = ("identity", "memory_limit_bytes")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    identity: ZoneIdentity
    memory_limit_bytes: int
    def __init__(self, identity: _Optional[_Union[ZoneIdentity, _Mapping]] = ..., memory_limit_bytes: _Optional[int] = ...) -> None: ...

class RegisterZoneReply(_message.Message):
    __slots__ = ("socket_path", "memory_limit_bytes")
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    socket_path: str
    memory_limit_bytes: int
    def __init__(self, socket_path: _Optional[str] = ..., memory_limit_bytes: _Optional[int] = ...) -> None: ...

class RemoveZoneRequest(_message.Message):
    __slots__ = ("zone",)
    ZONE_FIELD_NUMBER: _ClassVar[int]
    zone: str
    def __init__(self, zone: _Optional[str] = ...) -> None: ...

class RemoveZoneReply(_message.Message):
    __slots__ = ("reclaimed",)
    class ReclaimedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RECLAIMED_FIELD_NUMBER: _ClassVar[int]
    reclaimed: _containers.ScalarMap[str, int]
    def __init__(self, reclaimed: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListZonesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ZoneStatus(_message.Message):
    __slots__ = ("identity", "socket_path", "memory_used_bytes", "memory_limit_bytes", "handles")
    class HandlesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    identity: ZoneIdentity
    socket_path: str
    memory_used_bytes: int
    memory_limit_bytes: int
    handles: _containers.ScalarMap[str, int]
    def __init__(self, identity: _Optional[_Union[ZoneIdentity, _Mapping]] = ..., socket_path: _Optional[str] = ..., memory_used_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., handles: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListZonesReply(_message.Message):
    __slots__ = ("zones",)
    ZONES_FIELD_NUMBER: _ClassVar[int]
    zones: _containers.RepeatedCompositeFieldContainer[ZoneStatus]
    def __init__(self, zones: _Optional[_Iterable[_Union[ZoneStatus, _Mapping]]] = ...) -> None: ...
