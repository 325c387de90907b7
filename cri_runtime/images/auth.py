"""Registry credentials (CRI's AuthConfig) and the WWW-Authenticate challenge they answer.

Registries ask for auth with a 401 and a challenge: `Basic realm=...` (send the credentials
on every request) or `Bearer realm=...,service=...` (trade them, or nothing for anonymous
pulls, at the realm's token service for a token scoped to the repository).
"""

from __future__ import annotations

import base64
import binascii
import re

from pydantic import BaseModel, ConfigDict, Field

from cri_runtime.images.errors import AuthenticationFailed

_PARAM = re.compile(r'([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


class RegistryAuth(BaseModel):
    """Credentials kubelet passes with PullImage; every field may be empty."""

    model_config = ConfigDict(frozen=True)

    username: str = ""
    password: str = Field(default="", repr=False)  # secrets stay out of logs and tracebacks
    auth: str = Field(default="", repr=False)  # base64("user:password") as in docker config.json
    identity_token: str = Field(default="", repr=False)  # OAuth2 refresh token for the realm
    registry_token: str = Field(default="", repr=False)  # bearer token sent to the registry as is

    def credentials(self) -> tuple[str, str] | None:
        """(username, password) from the explicit fields or the `auth` blob; None if absent."""
        if self.username or self.password:
            return self.username, self.password
        if not self.auth:
            return None
        try:
            decoded = base64.b64decode(self.auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise AuthenticationFailed(
                f"registry auth is not base64 'user:password': {exc}"
            ) from exc
        username, colon, password = decoded.partition(":")
        if not colon:
            raise AuthenticationFailed("registry auth is not base64 'user:password'")
        return username, password


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class Challenge(BaseModel):
    model_config = ConfigDict(frozen=True)

    scheme: str  # "bearer" or "basic", lowercased
    params: dict[str, str]


def parse_challenges(headers: list[str]) -> list[Challenge]:
    """Challenges from WWW-Authenticate headers, bearer first (it works without credentials)."""
    challenges = []
    for header in headers:
        for part in re.split(r",\s*(?=[A-Za-z]+\s+[A-Za-z0-9_-]+\s*=)", header):
            scheme, _, rest = part.strip().partition(" ")
            params = {
                match.group(1).lower(): (
                    match.group(2).replace('\\"', '"')
                    if match.group(2) is not None
                    else match.group(3)
                )
                for match in _PARAM.finditer(rest)
            }
            if scheme:
                challenges.append(Challenge(scheme=scheme.lower(), params=params))
    return sorted(challenges, key=lambda challenge: challenge.scheme != "bearer")
