"""Per-registry endpoints configured like containerd's hosts directory, so a node's existing
mirror configuration works unchanged:

    <config_dir>/<registry host>/hosts.toml     (e.g. docker.io, 127.0.0.1:5000)
    <config_dir>/_default/hosts.toml             (registries without a directory of their own)

    server = "https://registry-1.docker.io"
    [host."http://127.0.0.1:5000"]
      capabilities = ["pull", "resolve"]
      skip_verify = false
      ca = "/etc/certs/mirror.pem"
      client = ["/etc/certs/client.crt", "/etc/certs/client.key"]
      override_path = false
      [host."http://127.0.0.1:5000".header]
        x-custom = "value"

Mirrors are tried in file order, then the server. Without configuration a registry's server
is https://<registry> (https://registry-1.docker.io for docker.io), except loopback registries
(localhost, 127.0.0.0/8, ::1), which are plain HTTP as for Docker's and containerd's
"insecure local registry" default.
"""

from __future__ import annotations

import ipaddress
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict

from cri_runtime.images.errors import InvalidHostsConfig
from cri_runtime.images.reference import DOCKER_HUB

log = structlog.get_logger(__name__)

PULL = "pull"
RESOLVE = "resolve"
PUSH = "push"
ALL_CAPABILITIES = frozenset({PULL, RESOLVE, PUSH})
DEFAULT_DIR = "_default"
DOCKER_HUB_SERVER = "https://registry-1.docker.io"


class ClientCert(BaseModel):
    model_config = ConfigDict(frozen=True)

    cert: Path
    key: Path | None = None  # None: the key is in the cert file


class Endpoint(BaseModel):
    """One place to fetch a registry's content from: a mirror or the registry's server."""

    model_config = ConfigDict(frozen=True)

    registry: str  # the registry the image reference names (sent to mirrors as ?ns=)
    base_url: str  # scheme://host[:port]/path, the prefix of /<repo>/manifests/<ref>
    capabilities: frozenset[str] = ALL_CAPABILITIES
    mirror: bool = False
    skip_verify: bool = False
    ca: tuple[Path, ...] = ()
    client: tuple[ClientCert, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.base_url).netloc

    @property
    def loopback(self) -> bool:
        return is_loopback(urllib.parse.urlsplit(self.base_url).hostname or "")

    def url(self, repository: str, kind: str, ref: str) -> str:
        """URL of a manifest or blob (`kind` is "manifests" or "blobs") on this endpoint."""
        query = f"?ns={urllib.parse.quote(self.registry)}" if self.mirror else ""
        return f"{self.base_url}/{repository}/{kind}/{ref}{query}"


class RegistryHosts:
    """Endpoints per registry host, read once from a hosts directory (None: defaults only)."""

    def __init__(self, configs: dict[str, dict[str, Any]], config_dir: Path | None) -> None:
        self._configs = configs
        self._config_dir = config_dir

    @classmethod
    def load(cls, config_dir: Path | None) -> RegistryHosts:
        configs: dict[str, dict[str, Any]] = {}
        if config_dir is not None and config_dir.is_dir():
            for path in sorted(config_dir.glob("*/hosts.toml")):
                try:
                    configs[path.parent.name] = tomllib.loads(path.read_text())
                except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                    raise InvalidHostsConfig(f"{path}: {exc}") from exc
        hosts = cls(configs, config_dir)
        for registry in configs:
            hosts.endpoints(registry)  # fail at load, not at the first pull
        log.info("registry hosts loaded", config_dir=str(config_dir), registries=sorted(configs))
        return hosts

    def endpoints(self, registry: str) -> list[Endpoint]:
        """Mirrors first, in file order, then the registry's server."""
        directory = registry if registry in self._configs else DEFAULT_DIR
        source = self._config_dir / directory / "hosts.toml" if self._config_dir else None
        try:
            return _endpoints(registry, self._configs.get(directory, {}))
        except (TypeError, ValueError) as exc:
            raise InvalidHostsConfig(f"{source}: {exc}") from exc


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_server(registry: str) -> str:
    if registry == DOCKER_HUB:
        return DOCKER_HUB_SERVER
    host = urllib.parse.urlsplit(f"//{registry}").hostname or registry
    return f"{'http' if is_loopback(host) else 'https'}://{registry}"


def _endpoints(registry: str, config: dict[str, Any]) -> list[Endpoint]:
    mirrors = config.get("host", {})
    if not isinstance(mirrors, dict):
        raise ValueError("[host] must be a table of mirror URLs")
    endpoints = [_endpoint(registry, url, fields, mirror=True) for url, fields in mirrors.items()]
    server_fields = {key: value for key, value in config.items() if key not in ("server", "host")}
    server = config.get("server", default_server(registry))
    endpoints.append(_endpoint(registry, server, server_fields, mirror=False))
    return endpoints


def _endpoint(registry: str, url: object, fields: object, *, mirror: bool) -> Endpoint:
    if not isinstance(url, str) or not isinstance(fields, dict):
        raise ValueError(f"host {url!r} must be a URL with a table of settings")
    unknown = set(fields) - {
        "capabilities",
        "skip_verify",
        "ca",
        "client",
        "header",
        "override_path",
    }
    if unknown:
        raise ValueError(f"host {url!r}: unknown settings {sorted(unknown)}")
    if "://" not in url:
        url = default_server(url)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"host {url!r} is not an http(s) URL")
    path = parts.path.rstrip("/")
    if not fields.get("override_path", False) and not path.endswith("/v2"):
        path = f"{path}/v2"
    capabilities = frozenset(_strings(fields.get("capabilities", sorted(ALL_CAPABILITIES))))
    if not capabilities <= ALL_CAPABILITIES:
        raise ValueError(
            f"host {url!r}: unknown capabilities {sorted(capabilities - ALL_CAPABILITIES)}"
        )
    headers = fields.get("header", {})
    if not isinstance(headers, dict):
        raise ValueError(f"host {url!r}: header must be a table")
    return Endpoint(
        registry=registry,
        base_url=f"{parts.scheme}://{parts.netloc}{path}",
        capabilities=capabilities,
        mirror=mirror,
        skip_verify=bool(fields.get("skip_verify", False)),
        ca=tuple(Path(ca) for ca in _strings(fields.get("ca", []))),
        client=_client_certs(fields.get("client", [])),
        headers=tuple(
            (name, value) for name, values in headers.items() for value in _strings(values)
        ),
    )


def _strings(value: object) -> list[str]:
    """A TOML value that may be one string or a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ValueError(f"expected a string or a list of strings, got {value!r}")


def _client_certs(value: object) -> tuple[ClientCert, ...]:
    """`client` is "cert", ["cert", "key"] or [["cert", "key"], ...] as in containerd."""
    if isinstance(value, str):
        return (ClientCert(cert=Path(value)),)
    if isinstance(value, list) and all(isinstance(item, list) for item in value):
        return tuple(_client_cert(item) for item in value)
    return (_client_cert(value),) if value else ()


def _client_cert(value: object) -> ClientCert:
    paths = _strings(value)
    if len(paths) not in (1, 2):
        raise ValueError(f"client must be [cert] or [cert, key], got {value!r}")
    return ClientCert(cert=Path(paths[0]), key=Path(paths[1]) if len(paths) == 2 else None)
