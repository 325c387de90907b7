import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    ZONE_REGISTERED: _ClassVar[EventKind]
    ZONE_REMOVED: _ClassVar[EventKind]
    CHANNEL_OPENED: _ClassVar[EventKind]
    CHANNEL_CLOSED: _ClassVar[EventKind]
    QUOTA_EXCEEDED: _ClassVar[EventKind]
    HANDLES_RECLAIMED: _ClassVar[EventKind]
    CALL_ERROR: _ClassVar[EventKind]
    PROTOCOL_VIOLATION: _ClassVar[EventKind]
EVENT_KIND_UNSPECIFIED: EventKind
ZONE_REGISTERED: EventKind
ZONE_REMOVED: EventKind
CHANNEL_OPENED: EventKind
CHANNEL_CLOSED: EventKind
QUOTA_EXCEEDED: EventKind
HANDLES_RECLAIMED: EventKind
CALL_ERROR: EventKind
PROTOCOL_VIOLATION: EventKind

class WatchRequest(_message.Message):
    __slots__ = ("zones", "kinds", "replay")
    ZONES_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    zones: _containers.RepeatedScalarFieldContainer[str]
    kinds: _containers.RepeatedScalarFieldContainer[EventKind]
    replay: bool
    def __init__(self, zones: _Optional[_Iterable[str]] = ..., kinds: _Optional[_Iterable[_Union[EventKind, str]]] = ..., replay: _Optional[bool] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "time", "zone", "kind", "message", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: _timestamp_pb2.Timestamp
    zone: str
    kind: EventKind
    message: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., zone: _Optional[str] = ..., kind: _Optional[_Union[EventKind, str]] = ..., message: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...
