"""Command-line flags with environment-variable twins.

Every flag of both services can also be set by an environment variable (the
twin is shown in --help), which is how containers are configured. Flags win
over the environment; the environment wins over the built-in default.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, NoReturn


@dataclass(frozen=True)
class ServerConfig:
    """The settings `server_flags` defines, shared by both services' configs."""
    host: str
    port: int
    health_port: int
    metrics_port: int
    reflection: bool
    max_message_mb: int
    max_streams: int
    grace_s: float
    log_level: str
    log_format: str
    tls_cert: str
    tls_key: str
    tls_client_ca: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def exit_startup(message: str) -> NoReturn:
    """The one way a service stops for a problem the operator must fix (a
    flag, a file, a port, a model): one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


_EXPIRY_WARNING_DAYS = 14


def check_server_flags(config: ServerConfig, name: str) -> None:
    """Refuse, before anything slow (a model, Milvus) starts: ports out of
    range or shared (gRPC binds with SO_REUSEPORT, so a health port equal to
    the service port would silently take part of its calls), TLS flags that
    do not go together, files that cannot be read, an expired certificate;
    warn when the certificate expires within two weeks."""
    ports = {"--port": config.port, "--health-port": config.health_port,
             "--metrics-port": config.metrics_port}
    for flag, port in ports.items():
        if not 0 <= port <= 65535:
            exit_startup(f"{name}: {flag} {port} is not a port (0 to 65535)")
    taken: dict[int, str] = {}
    for flag, port in ports.items():
        if port and port in taken:
            exit_startup(f"{name}: {flag} and {taken[port]} are both {port}: give each its own port")
        taken.setdefault(port, flag)
    _check_tls(config, name)


def _check_tls(config: ServerConfig, name: str) -> None:
    from imagesearch.security import SecurityConfigError, days_left, server_credentials
    if bool(config.tls_cert) != bool(config.tls_key) or (config.tls_client_ca and not config.tls_cert):
        exit_startup(f"{name}: --tls-cert and --tls-key go together, and --tls-client-ca needs them")
    if config.tls_cert:
        try:
            server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
            days = days_left(config.tls_cert)
        except SecurityConfigError as exc:
            exit_startup(f"{name}: {exc}")
        if days < 0:
            exit_startup(f"{name}: the TLS certificate {config.tls_cert} has expired: renew it")
        if days < _EXPIRY_WARNING_DAYS:
            logging.getLogger(__name__).warning(
                "%s: the TLS certificate %s expires in %.1f days: renew it", name,
                config.tls_cert, days)


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose `env_flag` reads a default from the environment."""

    def __init__(self, *args: Any, env_prefix: str, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.env_prefix = env_prefix
        self._section: Any = None  # the argument group env_flag adds to

    def section(self, title: str) -> None:
        """File the flags added from here on under their own heading in
        --help, so thirty flags read as a few topics."""
        self._section = self.add_argument_group(title)

    def env_flag(self, flag: str, *, default: Any, help: str,
                 type: Callable[[str], Any] = str, **kwargs: Any) -> None:
        """Add `--flag` with twin PREFIX_FLAG (dashes become underscores)."""
        env = self.env_prefix + flag.lstrip("-").replace("-", "_").upper()
        raw = os.environ.get(env)
        if raw is not None:
            try:
                default = type(raw)
            except ValueError as exc:
                self.error(f"environment variable {env}={raw!r} is invalid: {exc}")
            if "choices" in kwargs and default not in kwargs["choices"]:
                self.error(f"environment variable {env}={raw!r} is invalid: choose from "
                           f"{', '.join(map(str, kwargs['choices']))}")
        (self._section or self).add_argument(flag, default=default, type=type,
                                             help=f"{help} [env: {env}]", **kwargs)

    def server_flags(self, port: int) -> None:
        """The flags every gRPC server of ours has (`_SERVER_FLAGS`); `port` is
        the service's default port."""
        for section, flags in _SERVER_FLAGS.items():
            self.section(section)
            for flag, default, type, help, *choices in flags:
                self.env_flag(flag, default=port if flag == "--port" else default, type=type,
                              help=help, **({"choices": choices[0]} if choices else {}))


def at_least(minimum: int) -> Callable[[str], int]:
    """An int parser that refuses values below `minimum`."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its error messages
    return parse


positive_int = at_least(1)


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {text!r}")


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"must be above 0, got {value}")
    return value


# section -> (flag, default, type, help[, choices]); --port's default is each service's own.
_SERVER_FLAGS: dict[str, tuple[tuple, ...]] = {
    "serving": (
        ("--host", "0.0.0.0", str, "address to listen on"),
        ("--port", 0, int, "port to listen on"),
        ("--health-port", 0, int,
         "also serve grpc.health.v1, and nothing else, in plaintext on this port, for probes "
         "that cannot speak TLS (Kubernetes gRPC probes). Keep it off the Service: it answers "
         "anyone who reaches it. 0 (the default) turns it off"),
        ("--metrics-port", 0, int,
         "Prometheus metrics on http://HOST:PORT/metrics; 0 (the default) turns them off, so "
         "two local instances never clash. The container images and manifests set 9101 "
         "(embedder) and 9102 (search)")),
    "limits and operation": (
        ("--reflection", True, boolean,
         "gRPC server reflection, so grpcurl and other generic tools can list and call the "
         "services (true or false)"),
        ("--max-message-mb", 64, positive_int,
         "largest request or response message, in MiB (more: RESOURCE_EXHAUSTED)"),
        ("--max-streams", 100, positive_int,
         "concurrent calls one client connection may have open (HTTP/2 "
         "SETTINGS_MAX_CONCURRENT_STREAMS); more wait for a free one"),
        ("--grace-s", 10.0, positive_float, "on SIGTERM, seconds in-flight calls get to finish"),
        ("--log-level", "info", str, "debug, info, warning or error"),
        ("--log-format", "text", str, "text lines, or one JSON object per line for log "
         "collectors", ["text", "json"])),
    "TLS": (
        ("--tls-cert", "", str, "PEM certificate chain: serve TLS only (needs --tls-key)"),
        ("--tls-key", "", str, "PEM private key of --tls-cert"),
        ("--tls-client-ca", "", str,
         "PEM CA: also require client certificates it signed (mutual TLS)")),
}
