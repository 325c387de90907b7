"""Registry client (distribution v2 / OCI distribution API) for pulls.

`EndpointClient` talks to one endpoint (a mirror or the registry's server) and answers its auth
challenges. `RegistrySession` is one pull's view of a repository: each request goes to the
endpoints that have the capability for it (resolve for tags, pull for content by digest), in
order, and moves on when one fails, logging each failure; the last failure is what the caller
sees. Everything fetched by digest is verified before it is returned or kept.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar, cast

import structlog

from cri_runtime.images.auth import Challenge, RegistryAuth, basic_header, parse_challenges
from cri_runtime.images.digest import Hasher, digest_of, is_digest
from cri_runtime.images.errors import (
    AuthenticationFailed,
    CorruptImage,
    DigestMismatch,
    ImageError,
    ImageNotFound,
    RegistryUnavailable,
)
from cri_runtime.images.hosts import PULL, RESOLVE, Endpoint, is_loopback
from cri_runtime.images.manifest import ACCEPT, MAX_MANIFEST_BYTES, Descriptor
from cri_runtime.images.reference import Reference

log = structlog.get_logger(__name__)

USER_AGENT = "vgpu-runtime"
CHUNK = 1 << 20
DEFAULT_TIMEOUT_S = 30.0

T = TypeVar("T")
Response = http.client.HTTPResponse


class EndpointClient:
    """HTTP to one endpoint, with its TLS settings, auth challenges and token cache."""

    def __init__(
        self, endpoint: Endpoint, auth: RegistryAuth | None, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.endpoint = endpoint
        # Credentials are for the registry the image names; mirrors are pulled anonymously.
        self._auth = None if endpoint.mirror else auth
        self._timeout_s = timeout_s
        self._opener = _opener(endpoint.loopback, _ssl_context(endpoint))
        self._tokens: dict[str, str] = {}  # scope -> Authorization header value
        self._lock = threading.Lock()

    def get(self, repository: str, kind: str, ref: str, accept: str = "") -> Response:
        """GET a manifest or blob; returns the open 200 response or raises the ImageError the
        status means (the caller closes the response)."""
        url = self.endpoint.url(repository, kind, ref)
        scope = f"repository:{repository}:pull"
        headers: dict[str, str] = {}
        for name, value in self.endpoint.headers:
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if accept:
            headers["Accept"] = accept
        authorization = self._authorization(scope)
        response = self._open(url, headers, authorization)
        if response.status == 401:
            challenges = parse_challenges(response.headers.get_all("WWW-Authenticate") or [])
            response.close()
            authorization = self._answer(challenges, scope)
            response = self._open(url, headers, authorization)
        if response.status == 200:
            return response
        detail = _error_detail(response)
        response.close()
        host = self.endpoint.host
        what = f"{kind.removesuffix('s')} {ref} of {repository}"
        if response.status in (401, 403):
            raise AuthenticationFailed(f"{host} denied access to {what}: {detail}")
        if response.status == 404:
            raise ImageNotFound(f"{host} has no {what}: {detail}")
        if response.status == 429 or response.status >= 500:
            raise RegistryUnavailable(f"{host} answered {response.status} for {what}: {detail}")
        raise ImageError(f"{host} answered {response.status} for {what}: {detail}")

    def _authorization(self, scope: str) -> str | None:
        if self._auth is not None and self._auth.registry_token:
            return f"Bearer {self._auth.registry_token}"
        with self._lock:
            return self._tokens.get(scope)

    def _answer(self, challenges: list[Challenge], scope: str) -> str:
        """The Authorization header that answers the endpoint's challenge, cached per scope."""
        credentials = self._auth.credentials() if self._auth is not None else None
        for challenge in challenges:
            if challenge.scheme == "bearer" and "realm" in challenge.params:
                header = f"Bearer {self._fetch_token(challenge, scope, credentials)}"
                break
            if challenge.scheme == "basic":
                if credentials is None:
                    raise AuthenticationFailed(f"{self.endpoint.host} requires credentials")
                header = basic_header(*credentials)
                break
        else:
            raise AuthenticationFailed(
                f"{self.endpoint.host} asked for authentication without a usable challenge"
            )
        with self._lock:
            self._tokens[scope] = header
        return header

    def _fetch_token(
        self, challenge: Challenge, scope: str, credentials: tuple[str, str] | None
    ) -> str:
        realm = challenge.params["realm"]
        query = {"scope": scope}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        headers = {}
        data = None
        if self._auth is not None and self._auth.identity_token:
            data = urllib.parse.urlencode(
                {**query, "grant_type": "refresh_token", "client_id": USER_AGENT,
                 "refresh_token": self._auth.identity_token}
            ).encode()  # fmt: skip
            url = realm
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            url = f"{realm}{'&' if '?' in realm else '?'}{urllib.parse.urlencode(query)}"
        authorization = basic_header(*credentials) if credentials and data is None else None
        realm_parts = urllib.parse.urlsplit(realm)
        if realm_parts.scheme not in ("http", "https"):
            raise AuthenticationFailed(f"{self.endpoint.host} named a bad token realm {realm!r}")
        opener = (
            self._opener
            if realm_parts.netloc == self.endpoint.host
            else _opener(is_loopback(realm_parts.hostname or ""), ssl.create_default_context())
        )
        response = self._open(url, headers, authorization, data=data, opener=opener)
        with response:
            body = response.read(MAX_MANIFEST_BYTES)
            if response.status in (400, 401, 403):
                raise AuthenticationFailed(
                    f"token service {realm} refused the credentials for {self.endpoint.host} "
                    f"({response.status}: {body[:200].decode(errors='replace')})"
                )
            if response.status != 200:
                raise RegistryUnavailable(f"token service {realm} answered {response.status}")
        try:
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthenticationFailed(f"token service {realm} returned no token")
        return token

    def _open(
        self,
        url: str,
        headers: dict[str, str],
        authorization: str | None,
        data: bytes | None = None,
        opener: urllib.request.OpenerDirector | None = None,
    ) -> Response:
        request = urllib.request.Request(url, data=data, headers={"User-Agent": USER_AGENT})
        for name, value in headers.items():
            request.add_header(name, value)
        if authorization:  # unredirected: a blob redirect to storage must not carry it
            request.add_unredirected_header("Authorization", authorization)
        host = urllib.parse.urlsplit(url).netloc
        try:
            return cast(Response, (opener or self._opener).open(request, timeout=self._timeout_s))
        except urllib.error.HTTPError as exc:
            return cast(Response, exc)  # an HTTP answer, only not a 2xx: the caller decides
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise RegistryUnavailable(f"cannot reach {host}: {reason}") from exc


class RegistrySession:
    """One pull of one repository across its endpoints (mirrors first, then the server)."""

    def __init__(
        self,
        endpoints: list[Endpoint],
        reference: Reference,
        auth: RegistryAuth | None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.reference = reference
        self._clients = [EndpointClient(endpoint, auth, timeout_s) for endpoint in endpoints]
        self._down: set[int] = set()  # endpoints that did not answer: skipped for this pull
        self._lock = threading.Lock()

    def resolve(self) -> tuple[str, bytes, str]:
        """(digest, body, content type) of the manifest or index the reference names; by tag
        the digest is computed here, by digest the body is verified against it."""
        ref = self.reference.manifest_ref
        capability = PULL if self.reference.digest else RESOLVE

        def fetch(client: EndpointClient) -> tuple[str, bytes, str]:
            body, content_type, claimed = self._manifest(client, ref)
            if self.reference.digest:
                return self.reference.digest, body, content_type
            digest = digest_of(body)
            if claimed.startswith("sha256:") and claimed != digest:  # the registry's own claim
                raise DigestMismatch(f"manifest {self.reference}", claimed, digest)
            return digest, body, content_type

        with self._not_found_is_the_image():
            return self._each_endpoint(capability, f"manifest {self.reference}", fetch)

    def manifest(self, digest: str) -> tuple[bytes, str]:
        """(body, content type) of a manifest by digest, verified."""

        def fetch(client: EndpointClient) -> tuple[bytes, str]:
            body, content_type, _ = self._manifest(client, digest)
            return body, content_type

        with self._not_found_is_the_image():
            return self._each_endpoint(PULL, f"manifest {digest} of {self.reference}", fetch)

    def small_blob(self, descriptor: Descriptor, limit: int) -> bytes:
        """A blob small enough for memory (an image config), verified."""
        if descriptor.size > limit:
            raise CorruptImage(
                f"blob {descriptor.digest} of {self.reference} is over {limit} bytes"
            )

        def fetch(client: EndpointClient) -> bytes:
            with client.get(self.reference.repository, "blobs", descriptor.digest) as response:
                data = _read(response, descriptor.size + 1, client.endpoint)
            hasher = Hasher.for_digest(descriptor.digest)
            hasher.update(data)
            hasher.verify(f"blob of {self.reference}", descriptor.digest)
            return data

        return self._each_endpoint(PULL, f"blob {descriptor.digest} of {self.reference}", fetch)

    def blob_to_file(self, descriptor: Descriptor, dest: Path) -> None:
        """Stream a blob into `dest` (truncated first on each attempt), verified."""

        def fetch(client: EndpointClient) -> None:
            hasher = Hasher.for_digest(descriptor.digest)
            written = 0
            with (
                client.get(self.reference.repository, "blobs", descriptor.digest) as response,
                dest.open("wb") as file,
            ):
                while chunk := _read(response, CHUNK, client.endpoint):
                    written += len(chunk)
                    if written > descriptor.size:
                        raise CorruptImage(
                            f"blob {descriptor.digest} of {self.reference} is longer than "
                            f"the {descriptor.size} bytes its manifest says"
                        )
                    hasher.update(chunk)
                    file.write(chunk)
            hasher.verify(f"blob of {self.reference}", descriptor.digest)

        self._each_endpoint(PULL, f"blob {descriptor.digest} of {self.reference}", fetch)

    def _manifest(self, client: EndpointClient, ref: str) -> tuple[bytes, str, str]:
        with client.get(self.reference.repository, "manifests", ref, accept=ACCEPT) as response:
            body = _read(response, MAX_MANIFEST_BYTES + 1, client.endpoint)
            content_type = response.headers.get("Content-Type", "")
            claimed = response.headers.get("Docker-Content-Digest", "")
        if len(body) > MAX_MANIFEST_BYTES:
            raise CorruptImage(
                f"manifest {ref} of {self.reference} is over {MAX_MANIFEST_BYTES} bytes"
            )
        if is_digest(ref):
            hasher = Hasher.for_digest(ref)
            hasher.update(body)
            hasher.verify(f"manifest of {self.reference}", ref)
        return body, content_type, claimed

    def _each_endpoint(self, capability: str, what: str, fetch: Callable[[EndpointClient], T]) -> T:
        with self._lock:
            candidates = [
                (index, client)
                for index, client in enumerate(self._clients)
                if capability in client.endpoint.capabilities and index not in self._down
            ]
        if not candidates:
            raise RegistryUnavailable(
                f"no reachable endpoint of {self.reference.registry} can {capability} {what}"
            )
        failure: ImageError | None = None
        for index, client in candidates:
            try:
                return fetch(client)
            except ImageError as exc:
                log.warning(
                    "registry endpoint failed",
                    what=what,
                    endpoint=client.endpoint.base_url,
                    mirror=client.endpoint.mirror,
                    error=str(exc),
                    error_type=type(exc).__name__,
                )
                if isinstance(exc, RegistryUnavailable):
                    with self._lock:
                        self._down.add(index)
                failure = exc
        assert failure is not None  # candidates was not empty and every one failed
        raise failure

    @contextmanager
    def _not_found_is_the_image(self) -> Iterator[None]:
        """A missing manifest means the image (tag, digest or repository) does not exist."""
        try:
            yield
        except ImageNotFound as exc:
            raise ImageNotFound(
                f"image {self.reference} not found on registry {self.reference.registry}: {exc}"
            ) from exc


def _read(response: Response, size: int, endpoint: Endpoint) -> bytes:
    try:
        return response.read(size)
    except (OSError, http.client.HTTPException) as exc:
        raise RegistryUnavailable(f"download from {endpoint.host} broke off: {exc!r}") from exc


def _error_detail(response: Response) -> str:
    """The registry's own error message ({"errors": [{"code", "message"}]}), else the body."""
    try:
        body = response.read(64 << 10)
    except (OSError, http.client.HTTPException):
        return ""
    try:
        errors = json.loads(body)["errors"]
        return "; ".join(f"{error.get('code', '')}: {error.get('message', '')}" for error in errors)
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:200].decode(errors="replace").strip()


def _ssl_context(endpoint: Endpoint) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for ca in endpoint.ca:
        context.load_verify_locations(cafile=ca)
    for client in endpoint.client:
        context.load_cert_chain(client.cert, client.key)
    if endpoint.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _opener(loopback: bool, context: ssl.SSLContext) -> urllib.request.OpenerDirector:
    """An opener with the endpoint's TLS settings; loopback never goes through a proxy."""
    proxies = urllib.request.ProxyHandler({} if loopback else None)
    return urllib.request.build_opener(proxies, urllib.request.HTTPSHandler(context=context))
