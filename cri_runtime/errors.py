"""Errors the runtime raises, each carrying the gRPC status code kubelet acts on."""

from __future__ import annotations

import grpc


class CriError(Exception):
    code = grpc.StatusCode.UNKNOWN


class NotFound(CriError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(CriError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class AlreadyExists(CriError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CriError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(CriError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CriError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(CriError):
    code = grpc.StatusCode.INTERNAL
