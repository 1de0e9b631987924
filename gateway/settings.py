"""The gateway's settings (command.py fills them for `triton-rerank api` and `serve`), and its start error.

Light to import (no FastAPI, no uvicorn): the command line and the launcher use both.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

MiB = 1024 * 1024
# Bodies of the largest size the gateway holds at once unless told (--max-buffered-bytes).
BUFFERED_BODIES = 4


@dataclass
class GatewaySettings:
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC endpoint
    # Triton's HTTP endpoint: when given, KServe v2 health and metadata (GET) are answered by asking it
    # (kserve_metadata.py), for tritonclient.http clients that reach Triton only through the gateway.
    triton_http_url: str | None = None
    # Seconds after which calls to Triton go over a new gRPC channel (the address resolved again):
    # Triton servers added behind one DNS name (a headless Service) get requests. None: one channel.
    triton_channel_max_age: float | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    # A second port on `host` with the same routes: `serve`'s public KServe v2 HTTP port (--http-port).
    kserve_port: int | None = None
    api_key: str | None = None
    served_model_name: str = "reranker"  # what /v1/models lists
    max_documents: int = 1000  # per request; more -> 413
    max_body_bytes: int = 16 * MiB  # more -> 413
    # Request bodies held at once, over all connections; a body that would pass it -> 503.
    # None: BUFFERED_BODIES times max_body_bytes (64 MiB by default).
    max_buffered_bytes: int | None = None
    # Chunks of one chunked body (what tritonserver allows after its fix); more -> 400.
    max_body_chunks: int = 65536
    body_timeout: float = 30.0  # seconds to send a whole body; slower -> 408
    header_timeout: float = 10.0  # seconds from a request's first byte to its last header; slower -> closed
    keep_alive_timeout: float = 5.0  # seconds a connection may carry no request; then closed
    max_connections: int = 1000  # open connections (or requests) at once; more -> 503
    max_header_bytes: int = 16 * 1024  # request line and headers; more -> 400
    # Host headers answered (Starlette's patterns: "example.com", "*.example.com", "*"). The command
    # line narrows it to the bound address (default_allowed_hosts); in-process users name their own.
    allowed_hosts: tuple[str, ...] = ("*",)
    max_concurrency: int = 64  # requests in Triton at once
    max_queue: int = 256  # requests waiting for a slot; more -> 429
    request_timeout: float = 300.0  # seconds for one call to Triton; more -> 504
    log_level: str = "info"

    def __post_init__(self):
        if self.max_buffered_bytes is None:
            self.max_buffered_bytes = BUFFERED_BODIES * self.max_body_bytes
        self.allowed_hosts = tuple(host_pattern(h) for h in self.allowed_hosts)
        problems = [f"--{name.replace('_', '-')} must be positive" for name in (
            "max_body_bytes", "max_buffered_bytes", "max_body_chunks", "body_timeout", "header_timeout",
            "keep_alive_timeout", "max_connections", "max_header_bytes") if getattr(self, name) <= 0]
        if self.triton_channel_max_age is not None and self.triton_channel_max_age <= 0:
            problems.append("--triton-channel-max-age must be positive (or left out: one channel)")
        if self.max_buffered_bytes < self.max_body_bytes:
            problems.append(f"--max-buffered-bytes ({self.max_buffered_bytes}) is below --max-body-bytes "
                            f"({self.max_body_bytes}): a body of the allowed size could never be taken")
        if not self.allowed_hosts:
            problems.append("--allowed-hosts is empty: name at least one host, or '*' for any")
        for pattern in self.allowed_hosts:
            # Starlette's TrustedHostMiddleware takes these; it checks them only at the first request.
            if not pattern or "*" in pattern[1:] or (pattern.startswith("*") and pattern != "*"
                                                     and not pattern.startswith("*.")):
                problems.append(f"--allowed-hosts: {pattern!r} is not a host name, an address, '*.domain' or '*'")
        if problems:
            raise GatewayStartError("; ".join(problems))


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """The Host headers a gateway bound to `host` answers when none are configured.

    Bound to a wildcard address (0.0.0.0, ::), any: it is meant to be reached under names only the
    deployer knows (and a load balancer in front may rewrite Host). Bound to one address, that address
    and the loopback names: a web page whose DNS name was rebound to that address cannot use it.
    """
    if host in ("", "0.0.0.0", "::"):
        return ("*",)
    hosts = [host, "localhost", "127.0.0.1", "::1"]
    return tuple(dict.fromkeys(host_pattern(h) for h in hosts))


def host_pattern(host: str) -> str:
    """A host as a Host header carries it: an IPv6 address in brackets ("[::1]"), a name lower-case."""
    host = host.strip().lower()
    try:
        if ipaddress.ip_address(host.strip("[]")).version == 6:
            return f"[{host.strip('[]')}]"
    except ValueError:
        pass
    return host


class GatewayStartError(RuntimeError):
    """The gateway could not start (its port is taken, most often)."""
