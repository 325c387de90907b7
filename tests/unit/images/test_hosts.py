"""hosts.toml in containerd's format: mirrors in file order before the server, capabilities,
TLS settings, plain-HTTP loopback defaults, and a clear error naming a bad file."""

from pathlib import Path

import pytest

from cri_runtime.images.errors import InvalidHostsConfig
from cri_runtime.images.hosts import RegistryHosts


def write_hosts(config_dir: Path, registry: str, text: str) -> None:
    (config_dir / registry).mkdir(parents=True)
    (config_dir / registry / "hosts.toml").write_text(text)


def test_defaults_without_config() -> None:
    hosts = RegistryHosts.load(None)
    [hub] = hosts.endpoints("docker.io")
    assert hub.base_url == "https://registry-1.docker.io/v2"
    assert hub.capabilities == {"pull", "resolve", "push"}
    assert not hub.mirror
    assert hosts.endpoints("ghcr.io")[0].base_url == "https://ghcr.io/v2"
    assert hosts.endpoints("127.0.0.1:5000")[0].base_url == "http://127.0.0.1:5000/v2"
    assert hosts.endpoints("localhost:5000")[0].base_url == "http://localhost:5000/v2"
    assert hosts.endpoints("[::1]:5000")[0].base_url == "http://[::1]:5000/v2"
    assert hosts.endpoints("[::1]:5000")[0].loopback


def test_mirrors_come_first_in_file_order(tmp_path: Path) -> None:
    write_hosts(
        tmp_path,
        "docker.io",
        """
server = "https://registry-1.docker.io"

[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]

[host."https://mirror.example.com/v2/proxy"]
  capabilities = ["pull"]
  skip_verify = true
  override_path = true
  [host."https://mirror.example.com/v2/proxy".header]
    x-team = ["gpu", "ml"]
""",
    )
    first, second, server = RegistryHosts.load(tmp_path).endpoints("docker.io")
    assert first.base_url == "http://127.0.0.1:5000/v2"
    assert first.capabilities == {"pull", "resolve"}
    assert first.mirror and first.loopback
    assert first.url("library/busybox", "manifests", "1") == (
        "http://127.0.0.1:5000/v2/library/busybox/manifests/1?ns=docker.io"
    )
    assert second.base_url == "https://mirror.example.com/v2/proxy"
    assert second.capabilities == {"pull"}
    assert second.skip_verify
    assert second.headers == (("x-team", "gpu"), ("x-team", "ml"))
    assert server.base_url == "https://registry-1.docker.io/v2"
    assert not server.mirror
    assert server.url("library/busybox", "blobs", "sha256:00") == (
        "https://registry-1.docker.io/v2/library/busybox/blobs/sha256:00"
    )


def test_server_settings_and_path_prefix(tmp_path: Path) -> None:
    write_hosts(
        tmp_path,
        "registry.internal:8443",
        """
server = "https://registry.internal:8443/prefix/"
ca = "/etc/certs/ca.pem"
client = [["/etc/certs/c.crt", "/etc/certs/c.key"]]
capabilities = ["pull", "resolve"]
""",
    )
    [server] = RegistryHosts.load(tmp_path).endpoints("registry.internal:8443")
    assert server.base_url == "https://registry.internal:8443/prefix/v2"
    assert server.ca == (Path("/etc/certs/ca.pem"),)
    assert [(c.cert, c.key) for c in server.client] == [
        (Path("/etc/certs/c.crt"), Path("/etc/certs/c.key"))
    ]


def test_default_dir_applies_to_registries_without_their_own(tmp_path: Path) -> None:
    write_hosts(tmp_path, "_default", '[host."http://localhost:5001"]\n')
    write_hosts(tmp_path, "ghcr.io", "")
    hosts = RegistryHosts.load(tmp_path)
    mirror, server = hosts.endpoints("quay.io")
    assert (mirror.base_url, server.base_url) == ("http://localhost:5001/v2", "https://quay.io/v2")
    assert [e.base_url for e in hosts.endpoints("ghcr.io")] == ["https://ghcr.io/v2"]


def test_bad_default_file_is_named(tmp_path: Path) -> None:
    write_hosts(tmp_path, "_default", '[host."gopher://m"]\n')
    with pytest.raises(InvalidHostsConfig, match=r"_default/hosts\.toml"):
        RegistryHosts.load(tmp_path)


def test_missing_dir_means_defaults(tmp_path: Path) -> None:
    hosts = RegistryHosts.load(tmp_path / "absent")
    assert [e.base_url for e in hosts.endpoints("quay.io")] == ["https://quay.io/v2"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("server = ", "Invalid value|Expected"),
        ('[host."http://m"]\ncapabilities = ["pull", "fly"]', "unknown capabilities"),
        ('[host."ftp://m"]', "not an http"),
        ('[host."http://m"]\ncolour = "red"', "unknown settings"),
        ('[host."http://m"]\nca = 3', "string or a list"),
        ("host = 1", "table of mirror"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, text: str, reason: str) -> None:
    write_hosts(tmp_path, "docker.io", text)
    with pytest.raises(InvalidHostsConfig, match=reason) as info:
        RegistryHosts.load(tmp_path)
    assert "docker.io/hosts.toml" in str(info.value)
