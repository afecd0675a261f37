"""The ``triton`` engine: the station's model, run by a Triton Inference Server over gRPC or HTTP.

The station keeps the model file and its card (normalisation, thresholds, the sha256 its
verdicts name); the server runs the same model, from a repository ``defectd build-engine
--backend triton`` wrote. At open the engine checks that the server is up, that the model is
ready, that its input/output shapes fit the card, and that the sha256 in the model's config
parameters is the sha256 of the station's file: a server running another model is refused.

``infer`` never hangs: each request has a timeout and a bounded number of tries. When all fail,
the server counts as down and the batch raises ``EngineError`` (its frames get ``error``
verdicts); while down, batches fail at once without touching the network, except one every
back-off interval, which reconnects on a fresh channel and checks the model again before it
runs: the first one that succeeds ends the outage. ``server_status()`` tells the station.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from defectd.engines.base import BackendEngine, EngineSpec, OpenRequest
from defectd.engines.model_file import prepare_onnx
from defectd.engines.remote import ServerStatus, TritonOptions
from defectd.errors import EngineError, ModelError
from defectd.log import get_logger
from defectd.model.card import file_sha256

log = get_logger(__name__)

SHA_PARAMETER = "defectd_sha256"
NAME_PARAMETER = "defectd_model"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class ServedModel:
    """What the server says about one model: I/O names and shapes, batch limit, parameters."""

    def __init__(self, metadata: dict[str, Any], config: dict[str, Any]) -> None:
        inputs, outputs = metadata.get("inputs", []), metadata.get("outputs", [])
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(
                f"server model {metadata.get('name')!r} has {len(inputs)} input(s) and "
                f"{len(outputs)} output(s); defectd models have one of each"
            )
        self.input = str(inputs[0]["name"])
        self.output = str(outputs[0]["name"])
        self.input_dtype = str(inputs[0]["datatype"])
        self.input_shape = tuple(int(d) for d in inputs[0]["shape"])
        self.output_shape = tuple(int(d) for d in outputs[0]["shape"])
        self.max_batch = int(config.get("max_batch_size", 0))
        params = config.get("parameters", {}) or {}
        self.parameters = {str(k): str(v.get("string_value", "")) for k, v in params.items()}
        self.versions = [str(v) for v in metadata.get("versions", [])]


class _Client:
    """One connection to the server in the chosen protocol (``tritonclient.grpc`` or
    ``.http``); the methods answer in JSON form for both."""

    def __init__(self, options: TritonOptions) -> None:
        self.options = options
        timeout_s = options.timeout_ms / 1e3
        if options.protocol == "grpc":
            import tritonclient.grpc as client  # noqa: PLC0415  (only a triton station loads it)

            self._client: Any = client.InferenceServerClient(options.url)
        else:
            import tritonclient.http as client  # noqa: PLC0415

            self._client = client.InferenceServerClient(
                options.url, connection_timeout=timeout_s, network_timeout=timeout_s
            )
        self._module: Any = client

    def server_version(self, timeout_s: float) -> str:
        if self.options.protocol == "grpc":
            meta = self._client.get_server_metadata(as_json=True, client_timeout=timeout_s)
        else:
            meta = self._client.get_server_metadata()
        return f"{meta.get('name', 'triton')} {meta.get('version', '?')}"

    def ready(self, name: str, version: str, timeout_s: float) -> bool:
        if self.options.protocol == "grpc":
            return bool(self._client.is_model_ready(name, version, client_timeout=timeout_s))
        return bool(self._client.is_model_ready(name, version))

    def live(self, timeout_s: float) -> bool:
        if self.options.protocol == "grpc":
            return bool(self._client.is_server_live(client_timeout=timeout_s))
        return bool(self._client.is_server_live())

    def describe(self, name: str, version: str, timeout_s: float) -> ServedModel:
        if self.options.protocol == "grpc":
            meta = self._client.get_model_metadata(
                name, version, as_json=True, client_timeout=timeout_s
            )
            conf = self._client.get_model_config(
                name, version, as_json=True, client_timeout=timeout_s
            )
            conf = conf.get("config", conf)
            # gRPC's JSON form spells 64-bit integers as strings.
            for io in (*meta.get("inputs", []), *meta.get("outputs", [])):
                io["shape"] = [int(d) for d in io.get("shape", [])]
        else:
            meta = self._client.get_model_metadata(name, version)
            conf = self._client.get_model_config(name, version)
        return ServedModel(meta, conf)

    def infer(
        self, name: str, version: str, served: ServedModel, batch: NDArray[np.float32]
    ) -> NDArray[np.float32]:
        m = self._module
        inp = m.InferInput(served.input, list(batch.shape), "FP32")
        out = m.InferRequestedOutput(served.output)
        timeout_s = self.options.timeout_ms / 1e3
        if self.options.protocol == "grpc":
            inp.set_data_from_numpy(batch)
            result = self._client.infer(
                name, [inp], model_version=version, outputs=[out], client_timeout=timeout_s
            )
        else:
            inp.set_data_from_numpy(batch, binary_data=True)
            result = self._client.infer(
                name,
                [inp],
                model_version=version,
                outputs=[m.InferRequestedOutput(served.output, binary_data=True)],
                timeout=int(timeout_s * 1e6),
            )
        probs = result.as_numpy(served.output)
        if probs is None:
            raise EngineError(f"server returned no {served.output!r} output")
        return np.array(probs, dtype=np.float32, copy=True)

    def close(self) -> None:
        try:
            self._client.close()
        except Exception as exc:  # closing a broken channel must not mask the real error
            log.debug("triton_client_close_failed", error=_first_line(exc))


class TritonEngine(BackendEngine):
    """A model on a Triton server behind the engine contract. Calls are serialised by a lock;
    ``server_status`` reads a snapshot without it (the health check never waits on a request).
    """

    backend = "triton"

    def __init__(
        self,
        model_path: Path,
        spec: EngineSpec,
        *,
        precision: str,
        options: TritonOptions,
        model_name: str,
        sha256: str,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._path = model_path
        self._spec = spec
        self._precision = precision
        self.options = options
        self.model_name = model_name
        self._sha256 = sha256
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._client: _Client | None = None
        self._served: ServedModel | None = None
        self._server_version = "?"
        self._closed = False
        self._down_since: float | None = None
        self._next_try = 0.0
        self._failures = 0
        self._streak = 0
        self._recoveries = 0
        self._detail = ""
        self._connect(options.connect_timeout_s)

    # ------------------------------------------------------------------ contract

    @property
    def version(self) -> str:
        return self._server_version

    @property
    def model_file(self) -> Path:
        return self._path

    @property
    def url(self) -> str:
        return f"{self.options.protocol}://{self.options.url}"

    def server_status(self) -> ServerStatus:
        down = self._down_since
        return ServerStatus(
            url=self.url,
            model=self.model_name,
            reachable=down is None,
            detail=self._detail,
            down_for_s=0.0 if down is None else round(self._clock() - down, 3),
            failures=self._failures,
            recoveries=self._recoveries,
        )

    def _run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        with self._lock:
            if self._closed:
                raise EngineError(f"{self.url}: triton engine is closed")
            now = self._clock()
            if self._down_since is not None and now < self._next_try:
                raise EngineError(
                    f"inference server {self.url} down for {now - self._down_since:.1f} s "
                    f"({self._detail}); next try in {self._next_try - now:.2f} s"
                )
            tries = 1 if self._down_since is not None else 1 + self.options.retries
            error: Exception | None = None
            for k in range(tries):
                if k:
                    self._sleep(self.options.backoff_ms / 1e3 * 2 ** (k - 1))
                try:
                    if self._client is None or self._served is None:
                        self._connect(self.options.timeout_ms / 1e3)
                    assert self._client is not None and self._served is not None
                    out = self._client.infer(
                        self.model_name, self.options.model_version, self._served, batch
                    )
                except ModelError as exc:  # the server now serves another model: no retry
                    error = exc
                    break
                except Exception as exc:  # network, timeout, server errors: try again
                    error = exc
                    self._drop_client()
                    continue
                self._check_output(out, batch.shape[0])
                self._up()
                return out
            assert error is not None
            self._down(error)
            raise EngineError(
                f"inference server {self.url}, model {self.model_name!r}: {self._detail}"
            ) from error

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_client()

    # ------------------------------------------------------------------ connection

    def _connect(self, timeout_s: float) -> None:
        """A fresh client; the server live, the model ready and still the station's model.

        Raises ``EngineError`` when the server does not answer or the model is not ready,
        ``ModelError`` when it serves a model other than the station's.
        """
        self._drop_client()
        o = self.options
        client = _Client(o)
        try:
            try:
                if not client.live(timeout_s):
                    raise EngineError(f"inference server {self.url} is not live")
                if not client.ready(self.model_name, o.model_version, timeout_s):
                    raise EngineError(
                        f"inference server {self.url}: model {self.model_name!r} "
                        f"(version {o.model_version or 'latest'}) is not ready there"
                    )
                served = client.describe(self.model_name, o.model_version, timeout_s)
                self._server_version = client.server_version(timeout_s)
            except (EngineError, ModelError):
                raise
            except Exception as exc:  # tritonclient's InferenceServerException, OSError ...
                raise EngineError(
                    f"inference server {self.url} unreachable: {_first_line(exc)}"
                ) from exc
            self._check_served(served)
        except BaseException:
            client.close()
            raise
        self._client, self._served = client, served

    def _check_served(self, served: ServedModel) -> None:
        where = f"inference server {self.url}, model {self.model_name!r}"
        sha = served.parameters.get(SHA_PARAMETER)
        if not sha:
            raise ModelError(
                f"{where}: its config carries no {SHA_PARAMETER} parameter, so the station "
                f"cannot tell which model it runs; write the repository with "
                f"`defectd build-engine --backend triton --model {self._path}`"
            )
        if sha != self._sha256:
            raise ModelError(
                f"{where} runs the model with sha256 {sha[:12]}..., but the station's model "
                f"{self._path} has sha256 {self._sha256[:12]}...: deploy the same model on "
                "both (or point model.path at the file the server runs)"
            )
        c, h, w = self._spec.chw
        if served.input_dtype != "FP32" or served.input_shape[1:] != (c, h, w):
            raise ModelError(
                f"{where} takes {served.input_dtype} {list(served.input_shape)}; the card "
                f"says FP32 [-1, {c}, {h}, {w}]"
            )
        k = self._spec.outputs  # one channel per class of the card
        if served.output_shape[1:] != (k, h, w):
            raise ModelError(
                f"{where} returns {list(served.output_shape)}; defectd expects [-1, {k}, {h}, {w}]"
            )
        if served.max_batch and served.max_batch < self._spec.max_batch:
            raise EngineError(
                f"{where}: the server takes batches of up to {served.max_batch} "
                f"(max_batch_size), the station sends up to {self._spec.max_batch}: lower "
                "pipeline.max_batch or raise the server's max_batch_size"
            )

    def _check_output(self, out: NDArray[np.float32], n: int) -> None:
        want = (n, self._spec.outputs, self._spec.height, self._spec.width)
        if out.shape != want:
            raise EngineError(f"{self.url}: server returned {out.shape}, expected {want}")

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None
        self._served = None

    # ------------------------------------------------------------------ state

    def _down(self, error: Exception) -> None:
        now = self._clock()
        self._failures += 1
        self._streak += 1
        self._detail = _first_line(error)
        wait = min(
            self.options.backoff_ms / 1e3 * 2 ** (self._streak - 1), self.options.reconnect_max_s
        )
        self._next_try = now + wait
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "inference_server_down",
                url=self.url,
                model=self.model_name,
                error=self._detail,
                retry_in_s=round(wait, 3),
            )

    def _up(self) -> None:
        if self._down_since is not None:
            self._recoveries += 1
            log.info(
                "inference_server_back",
                url=self.url,
                model=self.model_name,
                down_s=round(self._clock() - self._down_since, 3),
                failed_batches=self._streak,
            )
        self._down_since = None
        self._streak = 0
        self._detail = ""


def open_request(request: OpenRequest, options: TritonOptions | None = None) -> TritonEngine:
    """The registry's entry point: the station's ONNX model (with its card) served by the Triton
    server ``options`` names (``request.remote``). Raises ``EngineError`` when the server cannot
    be reached within ``connect_timeout_s`` or does not serve the model, ``ModelError`` when it
    serves another model (sha256) or other shapes."""
    options = options or request.remote or TritonOptions()
    if not isinstance(options, TritonOptions):
        raise EngineError(f"triton backend: remote options {type(options).__name__} given")
    model = prepare_onnx(request)
    if model.precision != model.card.precision:
        raise EngineError(
            f"{model.path}: the triton backend runs the model as the server serves it "
            f"({model.card.precision}); precision {model.precision} is chosen on the server"
        )
    engine = TritonEngine(
        model.path,
        model.spec,
        precision=model.precision,
        options=options,
        model_name=options.model_name or model.card.name,
        sha256=file_sha256(model.path),
    )
    log.info(
        "triton_engine_ready",
        url=engine.url,
        model=engine.model_name,
        version=options.model_version or "latest",
        timeout_ms=options.timeout_ms,
        retries=options.retries,
    )
    return engine
