"""Registry auth against docker-registry 2.8: bearer tokens from a token service (the
WWW-Authenticate challenge → realm → JWT flow, RS256 tokens the registry verifies) and htpasswd
basic auth; good credentials pull, bad or missing ones are AuthenticationFailed."""

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri_runtime.images.errors import AuthenticationFailed
from cri_runtime.images.store import ImageStore, RegistryAuth
from devkit.images import push_image
from devkit.registry import LocalRegistry
from tests.registry import TokenServer, htpasswd_auth

USERS = {"alice": "wonderland"}


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    server = TokenServer(tmp_path_factory.mktemp("token-server"), USERS)
    yield server
    server.close()


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer
) -> Iterator[LocalRegistry]:
    local = LocalRegistry(
        tmp_path_factory.mktemp("token-registry"),
        auth=token_server.registry_auth(),
        credentials=("alice", USERS["alice"]),
    ).start()
    push_image(local, "private/app", "1", [{"secret": b"token protected"}])
    yield local
    local.stop()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    workdir = tmp_path_factory.mktemp("basic-registry")
    local = LocalRegistry(
        workdir, auth=htpasswd_auth(workdir, USERS), credentials=("alice", USERS["alice"])
    ).start()
    push_image(local, "private/app", "1", [{"secret": b"basic protected"}])
    yield local
    local.stop()


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def test_bearer_token_with_good_credentials(
    store: ImageStore, token_registry: LocalRegistry, token_server: TokenServer
) -> None:
    token_server.requests.clear()
    image = store.pull(
        f"{token_registry.host}/private/app:1",
        RegistryAuth(username="alice", password="wonderland"),
    )
    assert (store.layer_dirs(image)[0] / "secret").read_bytes() == b"token protected"
    # One token for the repository, reused for the manifest, config and layer requests.
    assert token_server.requests == [("alice", "repository:private/app:pull")]


@pytest.mark.parametrize(
    "auth",
    [
        RegistryAuth(auth=base64.b64encode(b"alice:wonderland").decode()),
        RegistryAuth(identity_token="refresh-alice"),
        None,  # replaced by a registry_token minted for alice below
    ],
    ids=["auth-blob", "identity-token", "registry-token"],
)
def test_other_credential_forms(
    store: ImageStore,
    token_registry: LocalRegistry,
    token_server: TokenServer,
    auth: RegistryAuth | None,
) -> None:
    if auth is None:
        token = token_server.sign("alice", "repository:private/app:pull")
        auth = RegistryAuth(registry_token=token)
    image = store.pull(f"{token_registry.host}/private/app:1", auth)
    assert image.repo_tags == [f"{token_registry.host}/private/app:1"]


@pytest.mark.parametrize(
    ("auth", "reason"),
    [
        (RegistryAuth(username="alice", password="wrong"), "refused the credentials"),
        (RegistryAuth(username="mallory", password="x"), "refused the credentials"),
        (RegistryAuth(identity_token="refresh-mallory"), "refused the credentials"),
        (None, "denied access to manifest 1 of private/app"),  # anonymous token: no access
    ],
)
def test_bearer_token_with_bad_credentials(
    store: ImageStore, token_registry: LocalRegistry, auth: RegistryAuth | None, reason: str
) -> None:
    with pytest.raises(AuthenticationFailed, match=reason):
        store.pull(f"{token_registry.host}/private/app:1", auth)
    assert store.list() == []


def test_basic_auth(store: ImageStore, basic_registry: LocalRegistry) -> None:
    ref = f"{basic_registry.host}/private/app:1"
    with pytest.raises(AuthenticationFailed, match="requires credentials"):
        store.pull(ref)
    with pytest.raises(AuthenticationFailed, match="denied access"):
        store.pull(ref, RegistryAuth(username="alice", password="wrong"))
    image = store.pull(ref, RegistryAuth(username="alice", password="wonderland"))
    assert (store.layer_dirs(image)[0] / "secret").read_bytes() == b"basic protected"
