"""Registry credentials and WWW-Authenticate challenges."""

import base64

import pytest

from cri_runtime.images.auth import RegistryAuth, parse_challenges
from cri_runtime.images.errors import AuthenticationFailed


def test_bearer_challenge_with_commas_in_quotes() -> None:
    [challenge] = parse_challenges(
        ['Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
         'scope="repository:library/busybox:pull,push"']
    )  # fmt: skip
    assert challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/busybox:pull,push",
    }


def test_bearer_is_preferred_over_basic() -> None:
    challenges = parse_challenges(['Basic realm="r1", Bearer realm="https://t/token"'])
    assert [c.scheme for c in challenges] == ["bearer", "basic"]
    assert challenges[1].params == {"realm": "r1"}


def test_credentials_from_fields_or_auth_blob() -> None:
    assert RegistryAuth(username="u", password="p").credentials() == ("u", "p")
    blob = base64.b64encode(b"user:pa:ss").decode()
    assert RegistryAuth(auth=blob).credentials() == ("user", "pa:ss")
    assert RegistryAuth().credentials() is None
    assert RegistryAuth(registry_token="t").credentials() is None


@pytest.mark.parametrize("blob", ["not base64!", base64.b64encode(b"no-colon").decode()])
def test_bad_auth_blob(blob: str) -> None:
    with pytest.raises(AuthenticationFailed, match="user:password"):
        RegistryAuth(auth=blob).credentials()


def test_secrets_stay_out_of_repr() -> None:
    auth = RegistryAuth(username="alice", password="hunter2", identity_token="tok")
    assert "hunter2" not in repr(auth) and "tok" not in str(auth)
    assert "alice" in repr(auth)
