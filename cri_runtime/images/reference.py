"""Image references with Docker's normalisation, so "busybox", "docker.io/library/busybox:latest"
and kubelet's fully qualified form all name the same image in the store.

Grammar and rules follow distribution's `reference` package: a domain is recognised only when
the first component has a "." or ":" or is "localhost" (or has uppercase letters); otherwise the
image is on docker.io and single-component names get "library/". The tag defaults to "latest"
only when no digest is given.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from cri_runtime.images.digest import check_digest
from cri_runtime.images.errors import InvalidReference

DOCKER_HUB = "docker.io"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$"
)
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_IMAGE_ID = re.compile(r"^[a-f0-9]{64}$")


class Reference(BaseModel):
    """A parsed, normalised image reference: registry host, repository path, tag and/or digest."""

    model_config = ConfigDict(frozen=True)

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, ref: str) -> Reference:
        if not ref:
            raise InvalidReference("empty image reference")
        name, at, digest = ref.partition("@")
        if at:
            try:
                check_digest(digest)
            except InvalidReference as exc:
                raise InvalidReference(f"invalid image reference {ref!r}: {exc}") from None
        tag: str | None = None
        last_slash = name.rfind("/")
        if name.rfind(":") > last_slash:
            name, _, tag = name.rpartition(":")
            if not _TAG.match(tag):
                raise InvalidReference(f"invalid image reference {ref!r}: bad tag {tag!r}")
        if len(name) > MAX_NAME_LENGTH:
            raise InvalidReference(
                f"invalid image reference {ref!r}: name longer than {MAX_NAME_LENGTH} characters"
            )
        if _IMAGE_ID.match(name):
            raise InvalidReference(
                f"invalid image reference {ref!r}: 64 hex digits are an image id"
            )
        registry, repository = _split_registry(name)
        if not _DOMAIN.match(registry):
            raise InvalidReference(f"invalid image reference {ref!r}: bad registry {registry!r}")
        if not _PATH.match(repository):
            reason = (
                "repository name must be lowercase"
                if _PATH.match(repository.lower())
                else f"bad repository name {repository!r}"
            )
            raise InvalidReference(f"invalid image reference {ref!r}: {reason}")
        if tag is None and not at:
            tag = DEFAULT_TAG
        return cls(registry=registry, repository=repository, tag=tag, digest=digest or None)

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.name}{tag}{digest}"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def manifest_ref(self) -> str:
        """What to ask the registry for: the digest when there is one (it pins the content),
        else the tag."""
        return self.digest or self.tag or DEFAULT_TAG


def _split_registry(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    is_domain = slash and (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    )
    if not is_domain:
        first, rest = DOCKER_HUB, name
    if first == "index.docker.io":
        first = DOCKER_HUB
    if first == DOCKER_HUB and "/" not in rest:
        rest = f"library/{rest}"
    return first, rest
