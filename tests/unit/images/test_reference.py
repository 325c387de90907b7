"""Reference parsing follows Docker's normalisation, so kubelet's and users' spellings of one
image land on one store entry; bad names fail with a message saying what is wrong."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cri_runtime.images.errors import InvalidReference
from cri_runtime.images.reference import Reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("library/busybox", "docker.io", "library/busybox", "latest", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/user/app:v1", "docker.io", "user/app", "v1", None),
        ("nvidia/cuda:12.4.1-base", "docker.io", "nvidia/cuda", "12.4.1-base", None),
        ("127.0.0.1:5000/x/y:1", "127.0.0.1:5000", "x/y", "1", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/a/b/c", "localhost:5000", "a/b/c", "latest", None),
        ("registry.k8s.io/pause:3.9", "registry.k8s.io", "pause", "3.9", None),
        ("Quay.IO/org/app", "Quay.IO", "org/app", "latest", None),
        ("[::1]:5000/app:2", "[::1]:5000", "app", "2", None),
        (f"busybox@{DIGEST}", "docker.io", "library/busybox", None, DIGEST),
        (f"ghcr.io/o/app:1@{DIGEST}", "ghcr.io", "o/app", "1", DIGEST),
        ("a_b--d/e__f.g", "docker.io", "a_b--d/e__f.g", "latest", None),
        ("a.b/c", "a.b", "c", "latest", None),
    ],
)  # fmt: skip
def test_parse_normalises(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert ref.name == f"{registry}/{repository}"
    assert Reference.parse(str(ref)) == ref


def test_str_is_the_full_form() -> None:
    assert str(Reference.parse("busybox")) == "docker.io/library/busybox:latest"
    assert str(Reference.parse(f"busybox@{DIGEST}")) == f"docker.io/library/busybox@{DIGEST}"
    assert Reference.parse(f"x.io/a:1@{DIGEST}").manifest_ref == DIGEST
    assert Reference.parse("x.io/a:1").manifest_ref == "1"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("Busybox", "must be lowercase"),
        ("docker.io/Library/busybox", "must be lowercase"),
        ("busybox:", "bad tag"),
        ("busybox:-x", "bad tag"),
        ("busybox:" + "t" * 129, "bad tag"),
        ("busybox@sha256:abc", "invalid digest"),
        ("busybox@md5:" + "a" * 32, "invalid digest"),
        ("busybox@sha256:" + "A" * 64, "invalid digest"),
        ("a//b", "bad repository"),
        ("a/b/", "bad repository"),
        ("-a/b", "bad repository"),
        ("a..b", "bad repository"),
        ("a b", "bad repository"),
        ("exa_mple.com:x/a", "bad registry"),
        ("x.io/" + "a" * 256, "longer than 255"),
        ("ab" * 32, "image id"),
    ],
)
def test_parse_rejects_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidReference, match=reason):
        Reference.parse(text)


_COMPONENT = st.from_regex(r"[a-z0-9]{1,8}(?:(?:[._]|__|-{1,2})[a-z0-9]{1,8}){0,2}", fullmatch=True)
_DOMAIN_PART = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?", fullmatch=True)
_DOMAIN = st.one_of(
    st.just("localhost"),
    st.builds(lambda a, b: f"{a}.{b}", _DOMAIN_PART, _DOMAIN_PART),
    st.builds(lambda a, port: f"{a}:{port}", _DOMAIN_PART, st.integers(1, 65535)),
)
_TAG = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}", fullmatch=True)
_DIGEST = st.from_regex(r"[0-9a-f]{64}", fullmatch=True).map(lambda hex_: f"sha256:{hex_}")


@given(
    domain=_DOMAIN,
    path=st.lists(_COMPONENT, min_size=1, max_size=3),
    tag=st.none() | _TAG,
    digest=st.none() | _DIGEST,
)
def test_round_trip(domain: str, path: list[str], tag: str | None, digest: str | None) -> None:
    text = (
        f"{domain}/{'/'.join(path)}" + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    )
    ref = Reference.parse(text)
    assert ref.registry == domain
    assert ref.repository == "/".join(path)
    assert ref.tag == (tag if tag or digest else "latest")
    assert ref.digest == digest
    assert str(ref) == text + ("" if tag or digest else ":latest")
    assert Reference.parse(str(ref)) == ref


_HUB_FIRST = st.from_regex(r"[a-z0-9]{1,8}(?:(?:_|__|-{1,2})[a-z0-9]{1,8}){0,2}", fullmatch=True)


@given(
    path=st.tuples(_HUB_FIRST, st.lists(_COMPONENT, max_size=2)).map(lambda p: [p[0], *p[1]]),
    tag=st.none() | _TAG,
)
def test_docker_hub_names_round_trip(path: list[str], tag: str | None) -> None:
    """Without a "." or ":" in the first component the name is on Docker Hub."""
    text = "/".join(path) + (f":{tag}" if tag else "")
    ref = Reference.parse(text)
    assert ref.registry == "docker.io"
    expected = "/".join(path) if len(path) > 1 else f"library/{path[0]}"
    assert ref.repository == expected
    assert Reference.parse(str(ref)) == ref
