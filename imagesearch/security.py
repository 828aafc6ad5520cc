"""TLS, mutual TLS and bearer-token authentication for our gRPC endpoints.

- A server with a certificate and key serves TLS only; with a client CA as
  well, it also requires client certificates signed by that CA (mutual TLS).
- A client trusts the server through a CA file, and presents its own
  certificate and key when the server asks for mutual TLS.
- Tokens are read from an environment variable or a file (one per line, so
  a new token can be added before the old one is removed; the file is read
  again when it changes, so tokens rotate without a restart), never from
  the command line, and never logged. Callers send `authorization: Bearer TOKEN`
  metadata; each configured token is compared in constant time.
"""
from __future__ import annotations

import datetime
import hmac
import logging
import os
import time
from pathlib import Path

import grpc

from imagesearch.handlers import rebuild

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
# Probes (kubelet, Docker, load balancers) carry no token.
_OPEN_SERVICES = ("/grpc.health.v1.Health/",)


class SecurityConfigError(ValueError):
    """A certificate, key or token file that cannot be used; the message says which."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


class ReloadingCertificate:
    """A server's TLS certificate and key (and client CA), read again when
    their files change, without a restart. cert-manager renews certificates
    in place at two thirds of their life (day 60 of 90), and Kubernetes
    swaps a Secret's files atomically; a server that read them only at start
    would serve the old certificate until it expired.

    gRPC asks `fetch` at each new TLS handshake; it compares the files'
    identity (inode, size, mtime), so a handshake costs a few stat calls. A
    changed set that does not load (a key that does not match its
    certificate, half-written files) is logged once and the previous one
    kept until the files change again."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self._paths = (cert, key, client_ca)
        self._current = self._load()  # SecurityConfigError at start, naming the file
        self._seen = self._identity()
        self._refused = None  # the files' identity when they last failed to load

    def _identity(self) -> tuple:
        return tuple((st.st_ino, st.st_size, st.st_mtime_ns) if path and (st := os.stat(path))
                     else None for path in self._paths)

    def _load(self):
        from cryptography import x509  # server side only: the [server] extra
        from cryptography.hazmat.primitives import serialization
        cert, key, client_ca = self._paths
        private_key, certificate = _read(key, "TLS key"), _read(cert, "TLS certificate")
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        try:
            matches = (serialization.load_pem_private_key(private_key, None).public_key()
                       .public_bytes(*spki)
                       == x509.load_pem_x509_certificate(certificate).public_key().public_bytes(*spki))
        except (ValueError, TypeError) as exc:
            raise SecurityConfigError(f"the TLS certificate {cert} or key {key} cannot be read "
                                      f"as PEM: {exc}") from exc
        if not matches:  # a mismatched pair must never replace a working one
            raise SecurityConfigError(f"the TLS key {key} is not the key of the certificate {cert}")
        return grpc.ssl_server_certificate_configuration(
            [(private_key, certificate)],
            root_certificates=_read(client_ca, "client CA") if client_ca else None)

    def fetch(self):
        """For gRPC: the new configuration when the files changed, else None (keep)."""
        try:
            seen = self._identity()
        except OSError:  # mid-swap: one file gone for a moment
            return None
        if seen in (self._seen, self._refused):
            return None
        try:
            self._current = self._load()
        except (OSError, SecurityConfigError) as exc:
            self._refused = seen
            log.warning("TLS files changed but cannot be used (the previous certificate "
                        "stays until they change again): %s", exc)
            return None
        self._seen = seen
        log.info("TLS certificate %s reloaded: it expires in %.1f days", self._paths[0],
                 days_left(self._paths[0]))
        return self._current

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._current, self.fetch,
                                                   require_client_authentication=bool(self._paths[2]))


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS with `cert` and `key`, read again when they change; with
    `client_ca`, client certificates are required."""
    return ReloadingCertificate(cert, key, client_ca).credentials()


def days_left(cert: str) -> float:
    """Days until the first certificate in the PEM file `cert` expires
    (negative once it has)."""
    from cryptography import x509  # server side only: the [server] extra
    try:
        parsed = x509.load_pem_x509_certificate(_read(cert, "TLS certificate"))
    except ValueError as exc:
        raise SecurityConfigError(f"the TLS certificate {cert} is not a PEM certificate: "
                                  f"{exc}") from exc
    left = parsed.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    return left.total_seconds() / 86400


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """Trust the server through `ca` (the system roots when empty); present
    `cert` and `key` for mutual TLS when both are given."""
    if bool(cert) != bool(key):
        raise SecurityConfigError("give both a client certificate and its key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA") if ca else None,
        private_key=_read(key, "client key") if key else None,
        certificate_chain=_read(cert, "client certificate") if cert else None)


class Tokens:
    """The accepted tokens: the environment variable's value and the file's
    non-empty lines. The file is checked for changes at most once a second
    and read again when it changed; if it cannot be read then, the tokens
    read before stay (and the failure is logged)."""

    def __init__(self, env_var: str, file: str = "", check_every_s: float = 1.0) -> None:
        self._env = os.environ.get(env_var, "").strip()
        self._file, self._check_every_s = file, check_every_s
        self._version: tuple | None = None
        self._next_check = 0.0
        self._tokens: list[bytes] = []
        self._load()  # an unreadable file at start is a start-up error

    def _load(self) -> None:
        lines = []
        if self._file:
            try:
                stat = os.stat(self._file)
            except OSError as exc:
                raise SecurityConfigError(f"cannot read the token file {self._file}: "
                                          f"{exc.strerror or exc}") from exc
            version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if version == self._version:
                return
            lines = _read(self._file, "token file").decode().splitlines()
            if self._version is not None:
                log.info("token file %s changed: tokens read again", self._file)
            self._version = version
        self._tokens = [t.strip().encode() for t in [self._env, *lines] if t.strip()]

    def current(self) -> list[bytes]:
        now = time.monotonic()
        if self._file and now >= self._next_check:
            self._next_check = now + self._check_every_s
            try:
                self._load()
            except SecurityConfigError as exc:
                log.warning("%s; keeping the tokens read before", exc)
        return self._tokens

    def __bool__(self) -> bool:
        """Whether authentication is on: some token was configured at start."""
        return bool(self._env or self._file)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that presents `token`."""
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call without a valid bearer token, except health checks."""

    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    def _valid(self, metadata) -> bool:
        header = dict(metadata or ()).get(AUTH_HEADER, "")
        scheme, _, presented = header.partition(" ")
        ok = False
        for token in self._tokens.current():  # no early exit: timing says nothing about which matched
            ok |= hmac.compare_digest(presented.strip().encode(), token)
        return ok and scheme.lower() == "bearer"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_OPEN_SERVICES) or \
                self._valid(handler_call_details.invocation_metadata):
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid token: send metadata "
                                "'authorization: Bearer TOKEN' with a token the server accepts")
        return rebuild(handler, lambda _: deny, raw=True)  # the bytes are never parsed
