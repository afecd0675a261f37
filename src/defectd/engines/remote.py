"""Settings and state of an engine that runs on an inference server (Triton), without its client.

Kept apart from ``triton_backend`` so that the station config, the registry and the health
report can name these types without importing ``tritonclient`` (only a station whose
``model.backend`` is ``triton`` loads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Protocol_ = Literal["grpc", "http"]


@dataclass(frozen=True, slots=True)
class TritonOptions:
    """Where the server is and how hard to try.

    ``url``: ``host:port`` of the server's gRPC (default 8001) or HTTP (8000) endpoint.
    ``model_name`` (None: the card's name) and ``model_version`` ("": the server's latest) name
    the model in the server's repository. Each request may take ``timeout_ms``; a failed one is
    tried again ``retries`` times, after ``backoff_ms``, then twice that, and so on. Once every
    try failed the server counts as down: batches fail at once (their frames get
    ``error:engine_error`` verdicts without waiting) and one batch every ``backoff_ms`` doubled
    per failure, capped at ``reconnect_max_s``, tries a fresh connection; the first that succeeds
    (with the model's sha256 checked again) brings the engine back.
    """

    url: str = "127.0.0.1:8001"
    protocol: Protocol_ = "grpc"
    model_name: str | None = None
    model_version: str = ""
    timeout_ms: float = 1000.0
    retries: int = 1
    backoff_ms: float = 50.0
    reconnect_max_s: float = 2.0
    connect_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """What a remote engine knows about its server now.

    ``reachable`` is False from the first batch that failed every try until one succeeds;
    ``down_for_s`` is how long since (0 while reachable); ``failures`` counts batches that
    failed, ``recoveries`` the times the server came back.
    """

    url: str
    model: str
    reachable: bool
    detail: str = ""
    down_for_s: float = 0.0
    failures: int = 0
    recoveries: int = 0


@runtime_checkable
class RemoteEngine(Protocol):
    """An engine whose model runs on a server: it can say whether that server answers."""

    def server_status(self) -> ServerStatus: ...
