"""Why an image operation failed, one class per cause, so the CRI server can map each to the
right gRPC status and kubelet's event says what an operator has to fix."""


class ImageError(Exception):
    """Base of every image-layer failure; the message names the image and the registry."""


class InvalidReference(ImageError):
    """The image name cannot be parsed (bad characters, uppercase repository, bad digest)."""


class InvalidHostsConfig(ImageError):
    """A hosts.toml under the registry config directory cannot be used; names the file."""


class ImageNotFound(ImageError):
    """The registry answered that the repository, tag, manifest or blob does not exist."""


class RegistryUnavailable(ImageError):
    """No answer from a registry host (refused, unreachable, timed out, TLS failure, 5xx)."""


class AuthenticationFailed(ImageError):
    """The registry or its token service refused the credentials (or asked for some)."""


class DigestMismatch(ImageError):
    """Content does not hash to the digest that names it: tampering or a broken registry."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: expected digest {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class CorruptImage(ImageError):
    """The content is not a usable linux/amd64 image: bad JSON or tar, unsupported media type,
    no linux/amd64 entry in an index, a layer entry escaping its directory."""
