"""The inspection pipeline end to end, next to two baselines measured in the same run.

Rows, each measured in its own worker process (so CPU% and peak RSS are its own), driven
round-robin so that load from other processes on the machine falls on every row alike:

- ``engine-only``: ``engine.infer`` on ready batches of ``--batch`` tiles: the ceiling.
- ``pipeline``: the real thing. An unthrottled synthetic line (``SyntheticSource``, admission
  ``block``) -> ``Pipeline`` (preprocess, dynamic batcher, the same engine, post-processing,
  rules) -> ``Publisher`` (durable SQLite outbox, MQTT QoS 1 to the broker).
- ``simple``: the honest baseline, the script a competent user writes first (``work_simple``):
  OpenVINO ``AsyncInferQueue`` with the THROUGHPUT hint on the same ONNX file and precision,
  numpy threshold + connected components, paho QoS 1 published asynchronously, the same
  synthetic frames and broker. Its rows alternate with the pipeline's (first, then second).
- ``naive`` (a footnote, not a baseline; ``--no-naive`` leaves it out): render one part, torch
  eager fp32 forward, threshold, publish and wait for the PUBACK, next part. A strawman.

Every report names the CPU and the load average (1 min) at the start of every run.

Latency is grab -> result delivered to a subscriber on the same broker (QoS 1, measured in the
driver process from the ``t_grab`` in each message): the broker forwards a message and
acknowledges it in the same step, so this is grab -> PUBACK to within a fraction of a
millisecond. The naive loop also reports its own grab -> PUBACK. The first 10% of frames of
each run are warm-up and left out.

The model is ``--model``, else ``models/demo/model.onnx`` or ``models/magnetic_tile/model.onnx``
when present, else a freshly initialised U-Net (base 16, depth 4, 1x256x256) exported to a
temp dir (speed does not depend on the weights). The engine is OpenVINO at the best precision
the model and CPU offer: int8 when a QDQ model ``<stem>.int8.onnx`` lies beside it (or with
``--quantize``), else bf16 where the CPU has it, else fp32. The naive loop runs the same
architecture in torch eager fp32 (the checkpoint beside the model when there is one).

``--viewers N`` runs the pipeline row twice per repeat, alternately without and with the operator
view served from the worker (``LiveFeed`` observer, the view's ASGI app on uvicorn) and N viewer
processes connected to its live stream, each fetching every image it is told of, as a browser
does; the ratio ``viewers_vs_none`` compares their frames/s (medians).

``--truth N`` adds a run over a seeded synthetic line of N parts with known truth and prints
the confusion matrix of part verdicts (fail and error count as rejects) against the truth.

    python bench/pipeline.py [--quick] [--json] [--batch 2] [--frames N] [--model M]
                             [--precision best|fp32|bf16|int8] [--quantize] [--mqtt HOST:PORT]
                             [--no-mqtt] [--no-naive] [--truth 2000] [--repeats 3] [--viewers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from _common import cpu_model, cpu_ticks, steal_percent

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = (
    ROOT / "models" / "demo" / "model.onnx",
    ROOT / "models" / "magnetic_tile" / "model.onnx",
)
FALLBACK_ARCH = {"in_channels": 1, "base": 16, "depth": 4}
FALLBACK_SIZE = 256
PREFIX = "defectd-bench"
WARMUP_FRACTION = 0.1


# --- helpers shared by driver and workers --------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


class Resources:
    """Process CPU time and peak RSS over a measured interval (RSS sampled every 20 ms)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self) -> Resources:
        self._cpu0 = sum(self._proc.cpu_times()[:2])
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = sum(self._proc.cpu_times()[:2]) - self._cpu0
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)

    def as_dict(self, frames: int) -> dict[str, float]:
        return {
            "cpu_percent": round(100.0 * self.cpu_s / self.wall_s, 1),
            "cpu_ms_per_frame": round(1e3 * self.cpu_s / max(frames, 1), 2),
            "peak_rss_mb": round(self._peak / 2**20, 1),
        }


def process_peak_rss_mb() -> float:
    """This process's peak resident set size since it started (``VmHWM``), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of each live thread of this process by thread name; threads
    that Python did not start (the runtime's: OpenVINO's streams, ...) add up under
    ``native (runtime)``. Names are the pipeline's (``defectd-infer-0``, ...)."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        name = names.get(int(tid), "native (runtime)")
        if name.startswith(("defectd-", "mqtt-publisher-")):  # one group per stage
            name = name.rstrip("0123456789").rstrip("-")
            name = "mqtt-publisher" if name.startswith("mqtt-publisher") else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def thread_cpu_per_frame(
    before: dict[str, float], after: dict[str, float], frames: int
) -> dict[str, float]:
    """CPU ms per frame of each thread group between two ``thread_cpu_s`` snapshots, largest
    first (groups under 0.01 ms/frame left out)."""
    diff = {k: 1e3 * (v - before.get(k, 0.0)) / max(frames, 1) for k, v in after.items()}
    return {k: round(v, 3) for k, v in sorted(diff.items(), key=lambda kv: -kv[1]) if v >= 0.01}


def steady_fps(times_s: list[float]) -> float:
    """Frames per second between the end of warm-up and the last frame."""
    times = sorted(times_s)
    skip = int(len(times) * WARMUP_FRACTION)
    kept = times[skip:]
    if len(kept) < 2 or kept[-1] <= kept[0]:
        return 0.0
    return (len(kept) - 1) / (kept[-1] - kept[0])


def steady_state(
    frames: int, done: list[float], lat_ms: list[float], latency: str, res: Resources
) -> dict[str, Any]:
    """The columns a frame-at-a-time row reports: ``frames``, the steady ``fps`` of the
    completion times ``done`` (s), the p50/p99 of ``lat_ms`` after the warm-up share as
    ``<latency>_p50_ms`` / ``<latency>_p99_ms``, and the process resources over ``frames``."""
    kept = lat_ms[int(len(lat_ms) * WARMUP_FRACTION) :]
    return {
        "frames": frames,
        "fps": round(steady_fps(done), 2),
        f"{latency}_p50_ms": percentile(kept, 50),
        f"{latency}_p99_ms": percentile(kept, 99),
        **res.as_dict(frames),
    }


def open_bench_engine(spec: dict[str, Any]) -> Any:
    from defectd.engines import open_engine

    return open_engine(
        Path(spec["model"]),
        backend=spec["backend"],
        precision=spec["precision"],
        max_batch=spec["batch"],
        mode=spec["mode"],
    )


# --- workers (one process each) -------------------------------------------------------------


def engine_only(
    engine: Any, card: Any, batch_size: int, seconds: float, seed: int
) -> dict[str, Any]:
    """``engine.infer`` on one ready batch of rendered parts, for ``seconds``, from as many
    threads as the engine runs requests in parallel (its ceiling)."""
    from defectd.data.synth import PartRenderer
    from defectd.engines.base import engine_concurrency

    c, h, w = card.input.channels, card.input.height, card.input.width
    renderer = PartRenderer(h, w, c)
    rng = np.random.default_rng(seed)
    raw = np.stack([renderer.render(rng, defect_prob=0.3).image for _ in range(batch_size)])
    raw = raw[:, None] if c == 1 else raw.transpose(0, 3, 1, 2)
    batch = card.normalisation.apply(raw)
    for _ in range(2):
        engine.infer(batch)
    lat: list[float] = []
    lock = threading.Lock()

    def loop(end: float) -> None:
        while time.perf_counter() < end or len(lat) < 5:
            t0 = time.perf_counter()
            engine.infer(batch)
            with lock:
                lat.append(time.perf_counter() - t0)

    with Resources() as res:
        end = time.perf_counter() + seconds
        threads = [
            threading.Thread(target=loop, args=(end,)) for _ in range(engine_concurrency(engine))
        ]
        t_start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
    return {
        "fps": round(batch_size * len(lat) / wall, 2),
        "threads": len(threads),
        "frames": batch_size * len(lat),
        "batch_p50_ms": percentile([x * 1e3 for x in lat], 50),
        "batch_p99_ms": percentile([x * 1e3 for x in lat], 99),
        **res.as_dict(batch_size * len(lat)),
    }


def render_cpu_ms(height: int, width: int, channels: int, seed: int, parts: int = 200) -> float:
    """CPU ms the synthetic line spends rendering one part in steady state (a real camera
    does not). The texture banks of every surface are built first, as the source does before
    its first frame: timing them would count a one-off start-up cost per frame."""
    from defectd.data.synth import SURFACES, PartRenderer

    renderer = PartRenderer(height, width, channels)
    rng = np.random.default_rng(seed)
    for surface in SURFACES:
        renderer.render(rng, surface=surface, defect_prob=0.0)
    t0 = time.thread_time()
    for _ in range(parts):
        renderer.render(rng, defect_prob=0.3)
    return round((time.thread_time() - t0) * 1e3 / parts, 3)


def work_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    from defectd.model.card import load_card
    from defectd.pipeline.config import PipelineConfig
    from defectd.pipeline.runner import Pipeline, PipelineResult
    from defectd.pipeline.sources import EventKind, SourceEvent, SyntheticSourceConfig
    from defectd.pipeline.sources.synthetic import SyntheticSource

    card = load_card(Path(spec["model"]))
    engine = open_bench_engine(spec)
    b = spec["batch"]
    # Engine-only right before and after the pipeline run, same process and engine: the
    # ceiling, bracketing the run so that changing load on the machine hits both alike.
    before = (
        engine_only(engine, card, b, spec["bracket_s"], spec["seed"])
        if spec.get("bracket_s")
        else None
    )
    publisher = None
    if spec["mqtt"]:
        from defectd.publish.config import MqttConfig, OutboxConfig
        from defectd.publish.mqtt import Publisher

        host, port = spec["mqtt"]
        publisher = Publisher(
            MqttConfig(
                host=host,
                port=port,
                topic_prefix=PREFIX,
                client_id=f"{spec['station']}-pub",
                session_expiry_s=0,
            ),
            OutboxConfig(path=Path(spec["workdir"]) / f"outbox-{uuid.uuid4().hex}.sqlite"),
            spec["station"],
        )
        publisher.start()
        deadline = time.monotonic() + 10
        while not publisher.stats().connected and time.monotonic() < deadline:
            time.sleep(0.05)

    verdict_times: list[float] = []
    records: list[tuple[str | None, bool | None, str]] = []
    lock = threading.Lock()
    view = OperatorViewForBench(spec) if spec.get("viewers") else None

    direct: list[tuple[str, str]] = []  # (pipeline verdict, the model run directly)

    def sink(result: PipelineResult) -> None:
        if publisher is not None:
            publisher.submit(result.inspection)
        if view is not None:
            view.feed(result)
        if spec.get("truth"):
            direct.append((result.inspection.verdict.value, direct_verdict(engine, card, result)))
        with lock:
            verdict_times.append(time.monotonic())
            records.append(
                (
                    result.frame.part_id,
                    result.frame.meta.get("truth_defective"),
                    result.inspection.verdict.value,
                )
            )

    ended = threading.Event()

    def on_event(event: SourceEvent) -> None:
        if event.kind == EventKind.END_OF_STREAM:
            ended.set()

    from defectd.engines.base import engine_concurrency

    # Enough in flight to keep every request busy, and one more ready behind them; more only
    # queues (latency) without adding frames per second.
    in_flight = spec["max_in_flight"] or max(
        2, -(-(engine_concurrency(engine) * b + 1) // spec["tiles_per_frame"])
    )
    cfg = PipelineConfig(
        mode=spec["mode"],
        max_batch=b,
        max_delay_ms=spec["max_delay_ms"],
        max_latency_ms=None,
        admission="block",
        max_in_flight=in_flight,
        full_frame=spec.get("full_frame", True),
        frame_queue=max(1, in_flight),
        job_queue=max(1, in_flight),
        workers=1,
    )
    pipe = Pipeline(engine, card, cfg, on_result=sink)
    source = SyntheticSource(
        SyntheticSourceConfig(
            camera="cam0",
            rate_hz=None,
            height=spec["height"],
            width=spec["width"],
            channels=card.input.channels,
            defect_rate=0.3,
            seed=spec["seed"],
            count=spec["frames"],
        ),
        spec["station"],
    )
    if spec.get("replay"):
        # Large frames rendered beforehand by another process: the synthetic renderer's
        # texture banks for a 5 MP part take ~1 GB and seconds of CPU a camera does not.
        from defectd.pipeline.sources import ReplaySourceConfig
        from defectd.pipeline.sources.replay import ReplaySource

        replay_cfg = ReplaySourceConfig(
            camera="cam0", path=Path(spec["replay"]), channels=card.input.channels
        )
        source = ReplaySource(replay_cfg, spec["station"])  # type: ignore[assignment]
    if view is not None:
        view.start(pipe)
    threads_before = thread_cpu_s()
    with Resources() as res:
        pipe.start()
        source.start(pipe.submit, on_event)
        ended.wait(timeout=3600)
        pipe.wait_idle(60)
        t_verdicts = time.monotonic()
        if publisher is not None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                st = publisher.stats()
                if st.outbox_depth == 0 and st.inflight == 0:
                    break
                time.sleep(0.01)
        t_acked = time.monotonic()
    threads_after = thread_cpu_s()
    stats = pipe.stats()
    source.stop()
    pipe.stop()
    peak_rss = process_peak_rss_mb()
    after = (
        engine_only(engine, card, b, spec["bracket_s"], spec["seed"])
        if spec.get("bracket_s")
        else None
    )
    viewed = view.stop() if view is not None else None
    pub_stats = publisher.stats() if publisher is not None else None
    if publisher is not None:
        publisher.stop(drain_timeout_s=5.0)
    stages = {k: v["p50"] for k, v in stats.latency_ms.items()}
    parts = {r[0] for r in records}
    out: dict[str, Any] = {
        "row": "pipeline",
        "engine": engine.name,
        "batch": b,
        "frames": len(records),
        "fps": round(steady_fps(verdict_times), 2),
        "mean_batch": stats.mean_batch,
        "max_in_flight": in_flight,
        "infer_requests": engine_concurrency(engine),
        "stage_p50_ms": stages,
        # Where the CPU went, by thread (the driver's own sampling thread included).
        "thread_cpu_ms_per_frame": thread_cpu_per_frame(
            threads_before, threads_after, len(records)
        ),
        "verdict_p50_ms": stats.latency_ms.get("total", {}).get("p50"),
        "verdict_p99_ms": stats.latency_ms.get("total", {}).get("p99"),
        "publish_lag_s": round(t_acked - t_verdicts, 3),
        "verdicts": stats.verdicts,
        "missing_verdicts": spec["frames"] - len(parts),
        **res.as_dict(len(records)),
    }
    out["peak_rss_process_mb"] = peak_rss  # before anything else runs in this process
    render_ms = (
        0.0  # replayed: nothing rendered in this process
        if spec.get("replay")
        else render_cpu_ms(spec["height"], spec["width"], card.input.channels, spec["seed"])
    )
    out["render_cpu_ms_per_frame"] = render_ms
    out["cpu_ms_per_frame_without_rendering"] = round(out["cpu_ms_per_frame"] - render_ms, 2)
    if before is not None and after is not None:
        out["engine_only"] = {
            "row": "engine-only",
            "engine": engine.name,
            "batch": b,
            "fps": round((before["fps"] + after["fps"]) / 2 / spec["tiles_per_frame"], 2),
            "tiles_per_frame": spec["tiles_per_frame"],
            "tile_fps_before_after": [before["fps"], after["fps"]],
            "batch_p50_ms": before["batch_p50_ms"],
            "batch_p99_ms": max(before["batch_p99_ms"] or 0, after["batch_p99_ms"] or 0),
            "cpu_percent": before["cpu_percent"],
            "cpu_ms_per_frame": round(
                (before["cpu_ms_per_frame"] + after["cpu_ms_per_frame"])
                / 2
                * spec["tiles_per_frame"],
                2,
            ),
            "peak_rss_mb": before["peak_rss_mb"],
        }
    if not spec.get("full_frame", True):
        out["row"] = "pipeline-tiled"
    if viewed is not None:
        out["row"] = "pipeline-viewers"
        out["view"] = viewed
    if pub_stats is not None:
        out["published_acked"] = pub_stats.acked
        out["publish_p99_ms"] = pub_stats.ack_latency_ms_p99
    if spec.get("truth"):
        out["truth"] = confusion(records)
        inspected = [(p, d) for p, d in direct if p != "error"]
        out["truth"]["agree_with_model_run_directly"] = sum(p == d for p, d in inspected)
        out["truth"]["compared_with_model_run_directly"] = len(inspected)
    return out


class OperatorViewForBench:
    """The daemon's operator view in the pipeline worker: the ``LiveFeed`` observer and the
    view's routes on the health endpoint's server, with ``spec["viewers"]`` viewer processes
    (``--worker viewer``) connected before the line starts."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from defectd.daemon.config import HealthSection
        from defectd.daemon.live import LiveFeed

        section = HealthSection()  # the daemon's defaults: view_fps, view_width
        self.count = int(spec["viewers"])
        self.feed = LiveFeed(max_fps=section.view_fps, width=section.view_width)
        self._procs: list[subprocess.Popen[str]] = []
        self._server: Any = None

    def start(self, pipe: Any) -> None:
        from defectd.daemon.health import HealthReport, HealthServer
        from defectd.daemon.view import RejectGallery, view_routes

        def station() -> dict[str, Any]:
            st = pipe.stats()
            return {"fps": st.fps, "verdicts": st.verdicts, "queues": st.queues}

        routes = view_routes(self.feed, station, RejectGallery(None, 24))
        self._server = HealthServer(
            "127.0.0.1:0", lambda: HealthReport(True, True), lambda: "", routes=routes
        )
        self._server.start()
        for _ in range(self.count):
            self._procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", "viewer", "--spec",
                     json.dumps({"url": self._server.url})],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while self.feed.viewers < self.count:
            if time.monotonic() > deadline:
                raise SystemExit("error: the viewers did not connect to the operator view")
            time.sleep(0.02)

    def stop(self) -> dict[str, Any]:
        """End the viewers; what they received and what the feed encoded."""
        received = []
        for proc in self._procs:
            proc.terminate()
            out, _ = proc.communicate(timeout=10)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            received.append(json.loads(lines[-1]) if lines else {})
        self.feed.stop()
        if self._server is not None:
            self._server.stop()
        return {"viewers": self.count, "encoded": self.feed.encoded, "received": received}


def work_viewer(spec: dict[str, Any]) -> dict[str, Any]:
    """A browser's traffic without the browser: read the live stream and fetch every image it
    announces, until SIGTERM; then the counts."""
    import http.client
    import signal
    from urllib.parse import urlsplit

    url = urlsplit(spec["url"])
    counts = {"events": 0, "frames": 0, "images": 0, "image_bytes": 0}

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    stream = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    images = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        stream.request("GET", "/api/live")
        resp = stream.getresponse()
        event = ""
        while True:
            line = resp.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                counts["events"] += 1
                if event == "frame":
                    counts["frames"] += 1
                    image = json.loads(line[6:]).get("image")
                    if image:
                        images.request("GET", image)
                        body = images.getresponse().read()
                        counts["images"] += 1
                        counts["image_bytes"] += len(body)
            elif not line and resp.isclosed():
                break
    except SystemExit:
        pass
    return counts


def direct_verdict(engine: Any, card: Any, result: Any) -> str:
    """The model's own verdict on a frame, without the pipeline: fit to the input as the card
    says, normalise, infer alone, threshold at the card's threshold, any region of at least
    ``min_area_px`` fails (the pipeline's default rule)."""
    import cv2

    from defectd.model.fit import fit_to_input

    image = result.frame.image
    h, w = card.input.height, card.input.width
    fitted, _ = fit_to_input(image, None, h, w, card.input.resize)
    raw = fitted[None, None] if fitted.ndim == 2 else fitted.transpose(2, 0, 1)[None]
    prob = engine.infer(card.normalisation.apply(raw))[0, 0]
    mask = (prob > card.threshold).astype(np.uint8)
    if fitted.shape[:2] != image.shape[:2]:
        from defectd.model.fit import restore_size

        mask = (restore_size(prob, image.shape[:2], card.input.resize) > card.threshold).astype(
            np.uint8
        )
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:n, cv2.CC_STAT_AREA]
    return "fail" if bool((areas >= max(card.min_area_px, 1)).any()) else "pass"


def confusion(records: list[tuple[str | None, bool | None, str]]) -> dict[str, Any]:
    """Part verdicts against truth; ``fail`` and ``error`` are rejects (the gate's view)."""
    tp = fn = fp = tn = errors = 0
    for _, truth, verdict in records:
        reject = verdict != "pass"
        errors += verdict == "error"
        if truth:
            tp += reject
            fn += not reject
        else:
            fp += reject
            tn += not reject
    n = tp + fn + fp + tn
    return {
        "parts": n,
        "defective_rejected": tp,
        "defective_passed": fn,
        "good_rejected": fp,
        "good_passed": tn,
        "errors": errors,
        "accuracy": round((tp + tn) / n, 4) if n else None,
        "escape_rate": round(fn / (tp + fn), 4) if tp + fn else None,
        "false_reject_rate": round(fp / (fp + tn), 4) if fp + tn else None,
    }


def load_torch_net(spec: dict[str, Any]) -> tuple[Any, str]:
    from defectd.model.card import load_card
    from defectd.model.checkpoint import load_checkpoint
    from defectd.model.unet import UNet, UNetConfig

    if spec.get("checkpoint"):
        net, _ = load_checkpoint(Path(spec["checkpoint"]))
        return net.eval(), "checkpoint"
    card = load_card(Path(spec["model"]))
    fields = set(UNetConfig.__dataclass_fields__)
    arch = {k: v for k, v in card.architecture.items() if k in fields}
    arch.setdefault("in_channels", card.input.channels)
    return UNet(UNetConfig(**arch)).eval(), "random weights of the card's architecture"


def results_client(spec: dict[str, Any], role: str) -> Any:
    """A paho client of the ``role`` row (``naive``, ``simple``) connected to the run's broker
    with its network loop started, or None when the run has no broker (``--no-mqtt``)."""
    if not spec["mqtt"]:
        return None
    import paho.mqtt.client as mqtt

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"{spec['station']}-{role}",
        protocol=mqtt.MQTTv5,
    )
    client.connect(*spec["mqtt"])
    client.loop_start()
    return client


def work_naive(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from defectd.data.synth import PartRenderer
    from defectd.model.card import load_card

    card = load_card(Path(spec["model"]))
    net, weights = load_torch_net(spec)
    torch.set_num_threads(os.cpu_count() or 1)
    c, h, w = card.input.channels, card.input.height, card.input.width
    renderer = PartRenderer(h, w, c)
    rng = np.random.default_rng(spec["seed"])
    client = results_client(spec, "naive")
    topic = f"{PREFIX}/{spec['station']}/cam0/result"
    renderer.render(rng)  # texture banks
    with torch.no_grad():  # the first forward allocates; a real loop has run many already
        net(torch.zeros(1, c, h, w))
    lat: list[float] = []
    done: list[float] = []
    with Resources() as res, torch.no_grad():
        for i in range(spec["frames"]):
            part = renderer.render(rng, defect_prob=0.3)
            t_grab, t0 = time.time(), time.perf_counter()
            raw = part.image[None, None] if c == 1 else part.image.transpose(2, 0, 1)[None]
            x = torch.from_numpy(card.normalisation.apply(raw))
            prob = torch.sigmoid(net(x))[0, 0].numpy()
            verdict = "fail" if bool((prob > card.threshold).any()) else "pass"
            payload = json.dumps(
                {
                    "result_id": uuid.uuid4().hex,
                    "station": spec["station"],
                    "camera": "cam0",
                    "seq": i,
                    "verdict": verdict,
                    "t_grab": {"epoch": t_grab},
                }
            )
            if client is not None:
                client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)
            lat.append((time.perf_counter() - t0) * 1e3)
            done.append(time.monotonic())
    if client is not None:
        client.loop_stop()
        client.disconnect()
    return {
        "row": "naive",
        "engine": "torch-fp32 eager",
        "weights": weights,
        "batch": 1,
        **steady_state(len(lat), done, lat, "puback", res),
    }


def work_simple(spec: dict[str, Any]) -> dict[str, Any]:
    """The script a competent user writes first (about 58 lines outside this bench): OpenVINO's
    ``AsyncInferQueue`` with the THROUGHPUT hint on the same ONNX file and precision (input
    reshaped to one static frame), numpy threshold + OpenCV connected components in the
    completion callback, paho QoS 1 published asynchronously (no wait for the PUBACK), fed the
    same synthetic frames by the same ``SyntheticSource``. No outbox, no deadlines, no tiling.
    """
    import cv2
    import openvino as ov
    import openvino.properties.hint as hints

    from defectd.model.card import load_card
    from defectd.pipeline.sources import EventKind, SourceEvent, SyntheticSourceConfig
    from defectd.pipeline.sources.synthetic import SyntheticSource

    card = load_card(Path(spec["model"]))
    model_file = Path(spec["model"])
    if spec["precision"] == "int8":
        model_file = model_file.with_name(model_file.stem + ".int8.onnx")
    c, h, w = card.input.channels, card.input.height, card.input.width
    core = ov.Core()
    model = core.read_model(str(model_file))
    model.reshape({model.input(0): ov.PartialShape([1, c, h, w])})
    precision = {"bf16": ov.Type.bf16}.get(spec["precision"], ov.Type.f32)
    compiled = core.compile_model(
        model,
        "CPU",
        {
            hints.performance_mode: hints.PerformanceMode.THROUGHPUT,
            hints.inference_precision: precision,
        },
    )
    infer_queue = ov.AsyncInferQueue(compiled)  # jobs: the CPU's optimal number of requests
    client = results_client(spec, "simple")
    topic = f"{PREFIX}/{spec['station']}/cam0/result"
    done: list[float] = []
    lat: list[float] = []
    published: list[Any] = []
    lock = threading.Lock()

    def on_done(request: Any, frame: Any) -> None:
        prob = request.get_output_tensor(0).data[0, 0]
        mask = (prob > card.threshold).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        areas = stats[1:n, cv2.CC_STAT_AREA]
        defects = [
            {"area_px": int(a), "bbox": [int(v) for v in stats[1 + i, :4]]}
            for i, a in enumerate(areas)
            if a >= card.min_area_px
        ]
        payload = json.dumps(
            {
                "result_id": uuid.uuid4().hex,
                "station": spec["station"],
                "camera": "cam0",
                "seq": frame.seq,
                "verdict": "fail" if defects else "pass",
                "defects": defects,
                "t_grab": {"epoch": frame.t_wall},
            }
        )
        with lock:
            if client is not None:
                published.append(client.publish(topic, payload, qos=1))
            done.append(time.monotonic())
            lat.append((time.monotonic_ns() - frame.t_host_ns) / 1e6)

    infer_queue.set_callback(on_done)
    ended = threading.Event()

    def on_frame(frame: Any) -> None:
        raw = frame.image[None, None] if c == 1 else frame.image.transpose(2, 0, 1)[None]
        infer_queue.start_async({0: card.normalisation.apply(raw)}, frame)

    def on_event(event: SourceEvent) -> None:
        if event.kind == EventKind.END_OF_STREAM:
            ended.set()

    source = SyntheticSource(
        SyntheticSourceConfig(
            camera="cam0",
            rate_hz=None,
            height=h,
            width=w,
            channels=c,
            defect_rate=0.3,
            seed=spec["seed"],
            count=spec["frames"],
        ),
        spec["station"],
    )
    with Resources() as res:
        source.start(on_frame, on_event)
        ended.wait(timeout=3600)
        infer_queue.wait_all()
        if client is not None:
            deadline = time.monotonic() + 30
            for info in published:
                info.wait_for_publish(timeout=max(deadline - time.monotonic(), 0.01))
    source.stop()
    if client is not None:
        client.loop_stop()
        client.disconnect()
    return {
        "row": "simple",
        "engine": f"openvino-{spec['precision']} AsyncInferQueue THROUGHPUT",
        "infer_requests": len(infer_queue),
        "batch": 1,
        **steady_state(len(done), done, lat, "verdict", res),
    }


def work_render(spec: dict[str, Any]) -> dict[str, Any]:
    """Render ``spec["frames"]`` synthetic parts as BMP files into ``spec["out"]``."""
    import cv2

    from defectd.data.synth import PartRenderer

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    renderer = PartRenderer(spec["height"], spec["width"], spec["channels"])
    rng = np.random.default_rng(spec["seed"])
    for i in range(spec["frames"]):
        part = renderer.render(rng, defect_prob=0.3)
        image = part.image if part.image.ndim == 2 else part.image[:, :, ::-1]
        cv2.imwrite(str(out / f"part_{i:05d}.bmp"), image)
    return {"frames": spec["frames"], "fps": 0.0}


WORKERS = {
    "render": work_render,
    "pipeline": work_pipeline,
    "simple": work_simple,
    "naive": work_naive,
    "viewer": work_viewer,
}


# --- driver -----------------------------------------------------------------------------------


class Subscriber:
    """Listens to this run's results on the broker; records grab -> delivery per message."""

    def __init__(self, host: str, port: int, station: str) -> None:
        import paho.mqtt.client as mqtt

        self.latency_ms: dict[str, list[tuple[int, float]]] = {}
        self.row = ""
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{station}-sub",
            protocol=mqtt.MQTTv5,
        )
        self._client.on_message = self._on_message
        self._ready = threading.Event()
        self._client.on_subscribe = lambda *a: self._ready.set()
        self._client.connect(host, port)
        self._client.loop_start()
        self._client.subscribe(f"{PREFIX}/{station}/+/result", qos=1)
        if not self._ready.wait(10):
            raise RuntimeError(f"no SUBACK from the broker at {host}:{port}")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        data = json.loads(msg.payload)
        with self._lock:
            self.latency_ms.setdefault(self.row, []).append(
                (int(data["seq"]), (now - float(data["t_grab"]["epoch"])) * 1e3)
            )

    def take(self, row: str, frames: int) -> dict[str, Any]:
        with self._lock:
            got = self.latency_ms.pop(row, [])
        kept = [ms for seq, ms in got if seq >= int(frames * WARMUP_FRACTION)]
        return {
            "delivered": len(got),
            "e2e_p50_ms": percentile(kept, 50),
            "e2e_p99_ms": percentile(kept, 99),
        }

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def resolve_model(arg: Path | None, large_frames: bool = False) -> tuple[Path, Path | None, str]:
    """(onnx path, torch checkpoint or None, description). For ``large_frames`` without
    ``arg``: the fresh U-Net with a card that says ``tile`` (a model that works at native
    scale: large frames are inspected at full resolution, not resized)."""
    for path in [arg] if arg else () if large_frames else SHIPPED:
        if path is not None and path.is_file():
            ckpt = next(
                (p for p in (path.with_suffix(".pt"), path.with_name("best.pt")) if p.is_file()),
                None,
            )
            return path, ckpt, str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        if arg:
            raise SystemExit(f"error: {arg}: model not found")
    from defectd.model.card import InputSpec, ModelCard, card_path
    from defectd.model.checkpoint import save_checkpoint
    from defectd.model.export import export_onnx
    from defectd.model.unet import UNet, UNetConfig

    policy = "tile" if large_frames else "resize"
    desc = (
        f"fresh U-Net base {FALLBACK_ARCH['base']} depth {FALLBACK_ARCH['depth']} 1x256x256, "
        f"fit {policy}"
    )
    # Exporting takes seconds; speed does not depend on the weights, so keep one between runs.
    cache = Path(tempfile.gettempdir()) / "defectd-bench" / f"fresh-b16-d4-256-{policy}"
    onnx_path, ckpt = cache / "model.onnx", cache / "model.pt"
    if not (onnx_path.is_file() and ckpt.is_file() and card_path(onnx_path).is_file()):
        net = UNet(UNetConfig(**FALLBACK_ARCH)).eval()  # type: ignore[arg-type]
        card = ModelCard(
            name="fresh-unet",
            architecture={"type": "unet", **net.config.as_dict()},
            input=InputSpec(
                channels=1,
                height=FALLBACK_SIZE,
                width=FALLBACK_SIZE,
                resize=policy,  # type: ignore[arg-type]
            ),
        )
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        card = export_onnx(net, card, tmp / "model.onnx")
        save_checkpoint(tmp / "model.pt", net, card)
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    return onnx_path, ckpt, desc


def choose_precision(model: Path, asked: str, quantize: bool, workdir: Path) -> tuple[Path, str]:
    """The model path and precision to open; with ``quantize`` a QDQ sibling is made in
    ``workdir`` from synthetic parts (beside a copy of the model)."""
    if asked != "best":
        return model, asked
    sibling = model.with_name(model.stem + ".int8.onnx")
    if sibling.is_file():
        return model, "int8"
    if quantize:
        from defectd.calibration.int8 import quantize_qdq
        from defectd.data.synth import PartRenderer
        from defectd.model.card import card_path, load_card

        copy = workdir / "q" / model.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(model, copy)
        shutil.copy(card_path(model), card_path(copy))
        card = load_card(copy)
        renderer = PartRenderer(card.input.height, card.input.width, card.input.channels)
        rng = np.random.default_rng(123)
        batches = []
        for _ in range(8):
            imgs = np.stack([renderer.render(rng).image for _ in range(4)])
            raw = imgs[:, None] if card.input.channels == 1 else imgs.transpose(0, 3, 1, 2)
            batches.append(card.normalisation.apply(raw))
        quantize_qdq(copy, copy.with_name(copy.stem + ".int8.onnx"), batches)
        return copy, "int8"
    from defectd.engines.openvino_backend import cpu_capabilities

    return model, "bf16" if "BF16" in cpu_capabilities() else "fp32"


def settle(below: float, max_s: float = 180.0) -> float:
    """Wait until the 1-minute load average is under ``below`` (at most ``max_s``); seconds
    waited. The average trails: a row that starts at 1.0 and keeps two cores busy for 30 s
    ends near 1.4, so the whole row runs under 1.5."""
    t0 = time.monotonic()
    while os.getloadavg()[0] >= below and time.monotonic() - t0 < max_s:
        time.sleep(2.0)
    return round(time.monotonic() - t0, 1)


def run_worker(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", mode, "--spec", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"error: {mode} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median fps, with the fps of every run alongside."""
    ordered = sorted(runs, key=lambda r: r["fps"])
    row = dict(ordered[(len(ordered) - 1) // 2])  # the lower median for an even count
    row["fps_runs"] = [r["fps"] for r in runs]
    row["cpu_ms_per_frame_runs"] = [r["cpu_ms_per_frame"] for r in runs]
    return row


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    rows = report.get("rows", {})
    if rows:
        print_rows(console, report, rows)
    if "truth" in report:
        t = report["truth"]
        console.print(
            f"truth ({t['parts']} parts, missing verdicts {report['truth_missing']}): "
            f"defective rejected {t['defective_rejected']}, "
            f"defective passed {t['defective_passed']}, good rejected {t['good_rejected']}, "
            f"good passed {t['good_passed']}, errors {t['errors']}; "
            f"accuracy {t['accuracy']}, escape rate {t['escape_rate']}, "
            f"false-reject rate {t['false_reject_rate']}; verdicts equal to the model run "
            f"directly on the same parts: {t['agree_with_model_run_directly']} of "
            f"{t['compared_with_model_run_directly']}"
        )


def print_rows(console: Any, report: dict[str, Any], rows: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(
        title=f"pipeline bench: {report['model']} on {report['engine']}, batch "
        f"{report['batch']}, {report['frame']} frames ({report['tiles_per_frame']} tiles each)"
    )
    cols = (
        "row",
        "frames/s",
        "e2e p50 ms",
        "e2e p99 ms",
        "CPU %",
        "CPU ms/frame",
        "RSS MB",
        "runs",
    )
    for col in cols:
        table.add_column(col, justify="right" if col != "row" else "left")
    for name in ("engine-only", "pipeline", "pipeline-tiled", "simple", "pipeline-viewers"):
        if name not in rows:
            continue
        r = rows[name]
        table.add_row(
            name,
            f"{r['fps']:.2f}",
            str(r.get("e2e_p50_ms", r.get("batch_p50_ms", "-"))),
            str(r.get("e2e_p99_ms", r.get("batch_p99_ms", "-"))),
            f"{r['cpu_percent']:.0f}",
            f"{r['cpu_ms_per_frame']:.1f}",
            f"{r.get('peak_rss_process_mb', r['peak_rss_mb']):.0f}",
            " ".join(f"{x:.1f}" for x in r["fps_runs"]),
        )
    console.print(table)
    ratios = report["ratios"]
    console.print(f"pipeline / engine-only = {ratios['pipeline_vs_engine']:.3f} (target >= 0.90)")
    console.print(f"checks: {json.dumps(report['checks'])}")
    if "pipeline-tiled" in rows:
        console.print(
            f"full-frame / tiled = {ratios['full_frame_vs_tiled']:.3f} frames/s (target >= 1.2); "
            f"peak RSS of the process {rows['pipeline']['peak_rss_process_mb']:.0f} MB "
            f"(target <= 600) vs tiled {rows['pipeline-tiled']['peak_rss_process_mb']:.0f} MB"
        )
    if "simple" in rows:
        console.print(
            f"pipeline / simple = {ratios['pipeline_vs_simple']:.3f} frames/s (target >= 1.0); "
            f"p99 pipeline / simple = {ratios.get('p99_pipeline_vs_simple')} (target <= 1.0): "
            f"{rows['pipeline'].get('e2e_p99_ms')} vs {rows['simple'].get('e2e_p99_ms')} ms"
        )
    if "pipeline-viewers" in rows:
        v = rows["pipeline-viewers"]
        console.print(
            f"with the operator view and {v['view']['viewers']} viewers / without = "
            f"{ratios['viewers_vs_none']:.3f} (target >= 0.95); CPU ms/frame median "
            f"{float(np.median(v['cpu_ms_per_frame_runs'])):.2f} vs "
            f"{float(np.median(rows['pipeline']['cpu_ms_per_frame_runs'])):.2f}; images encoded "
            f"{v['view']['encoded']}, received per viewer "
            f"{[x.get('images') for x in v['view']['received']]}"
        )
    console.print(f"pipeline stage p50 ms: {rows['pipeline']['stage_p50_ms']}")
    console.print(
        f"pipeline CPU ms per frame by thread: {rows['pipeline'].get('thread_cpu_ms_per_frame')}"
        " (the synthetic source's thread has ended by then: its rendering is measured apart)"
    )
    pipe = rows["pipeline"]
    console.print(
        f"pipeline CPU per frame {pipe['cpu_ms_per_frame']} ms, of which rendering the synthetic "
        f"part {pipe['render_cpu_ms_per_frame']} ms; without it "
        f"{pipe['cpu_ms_per_frame_without_rendering']} ms vs the bare engine's "
        f"{rows['engine-only']['cpu_ms_per_frame']} ms"
    )
    if "naive" in rows:
        n = rows["naive"]
        console.print(
            f"footnote, not a baseline: a torch eager fp32 loop (render, forward, threshold, "
            f"publish and wait for each PUBACK) ran {n['fps']:.1f} frames/s, e2e p50/p99 "
            f"{n.get('e2e_p50_ms')}/{n.get('e2e_p99_ms')} ms, CPU {n['cpu_ms_per_frame']:.1f} "
            "ms/frame: a strawman, which is why the simple row exists"
        )
    console.print(
        "e2e = grab -> result delivered to a subscriber (~PUBACK); the engine-only row shows "
        f"its batch latency; CPU % is of one core; {report['cpu_model']}, "
        f"{report['cpu_count']} cores, load average (1 min) at the start of each run "
        f"{report['load_avg_1m_per_run']}, at its end {report.get('load_avg_1m_end_of_run')}; "
        f"CPU time stolen by the hypervisor per run (%) {report.get('steal_percent_per_run')}"
    )


def checks(
    ratios: dict[str, float], rows: dict[str, Any], load_max: float, steal_max: float | None
) -> dict[str, Any]:
    """The targets of this bench, met or not, from this run (quiet: load average < 1.5; on a
    virtual machine also under 2% of the CPU time stolen by the host in every row)."""
    out: dict[str, Any] = {"quiet_machine": load_max < 1.5}
    out["low_steal"] = None if steal_max is None else steal_max < 2.0
    if "pipeline_vs_simple" in ratios:
        out["fps_vs_simple_ge_1"] = ratios["pipeline_vs_simple"] >= 1.0
    if "p99_pipeline_vs_simple" in ratios:
        out["p99_vs_simple_le_1"] = ratios["p99_pipeline_vs_simple"] <= 1.0
    out["pipeline_vs_engine_ge_0.90"] = ratios["pipeline_vs_engine"] >= 0.90
    if "full_frame_vs_tiled" in ratios:
        out["full_frame_vs_tiled_ge_1.2"] = ratios["full_frame_vs_tiled"] >= 1.2
        out["full_frame_peak_rss_le_600mb"] = rows["pipeline"]["peak_rss_process_mb"] <= 600
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument(
        "--model", type=Path, help="ONNX model with its card (default: shipped or fresh)"
    )
    parser.add_argument("--backend", default="openvino", help="engine backend (default openvino)")
    parser.add_argument("--precision", default="best", help="best (default), fp32, bf16, int8")
    parser.add_argument("--quantize", action="store_true", help="make an int8 QDQ model for 'best'")
    parser.add_argument(
        "--batch", type=int, default=1, help="max batch per request, same for engine-only"
    )
    parser.add_argument(
        "--mode", default="throughput", choices=("throughput", "latency"), help="[pipeline] mode"
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="default: the engine's parallel requests x batch + 1 frames",
    )
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--frames", type=int, default=None, help="frames per pipeline run")
    parser.add_argument("--repeats", type=int, default=None, help="runs per row (median)")
    parser.add_argument("--mqtt", default="127.0.0.1:1883", help="broker HOST:PORT")
    parser.add_argument("--no-mqtt", action="store_true", help="no broker: latency is to verdict")
    parser.add_argument("--truth", type=int, default=0, help="also run N parts against truth")
    parser.add_argument("--truth-only", action="store_true", help="only the --truth run")
    parser.add_argument(
        "--truth-seed", type=int, default=2026, help="seed of the truth line (not a training seed)"
    )
    parser.add_argument(
        "--frame",
        help="frame size WxH (e.g. 2448x2048): larger frames are tiled; no naive row then",
    )
    parser.add_argument(
        "--viewers",
        type=int,
        default=0,
        help="also run the pipeline with the operator view and N viewers connected (no naive row)",
    )
    parser.add_argument(
        "--no-naive", action="store_true", help="leave out the torch eager footnote row"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="before each row wait (at most 3 min) until the 1-minute load average is below"
        " this, e.g. 1.0: a row that saturates both cores then ends under ~1.5 (0: no wait)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer frames, one run (< 60 s)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()

    from defectd.log import configure_logging

    configure_logging("warning", "json")
    if args.worker:
        spec = json.loads(args.spec)
        print(json.dumps(WORKERS[args.worker](spec)))
        return

    repeats = 0 if args.truth_only else args.repeats or (1 if args.quick else 3)
    frames = args.frames or (100 if args.quick else 600)
    if args.frame and not args.frames:
        frames = 5 if args.quick else 12  # large frames take a second or more each
    mqtt = None
    if not args.no_mqtt:
        host, _, port = args.mqtt.rpartition(":")
        mqtt = (host, int(port))
    with tempfile.TemporaryDirectory(prefix="defectd-bench-") as tmp:
        workdir = Path(tmp)
        model, ckpt, model_desc = resolve_model(args.model, large_frames=bool(args.frame))
        model, precision = choose_precision(model, args.precision, args.quantize, workdir)
        from defectd.model.card import load_card

        card = load_card(model)
        station = f"bench{os.getpid()}"
        height, width = card.input.height, card.input.width
        if args.frame:
            w_s, _, h_s = args.frame.lower().partition("x")
            height, width = int(h_s), int(w_s)
        tiles_per_frame = 1
        if (height, width) != (card.input.height, card.input.width) and card.input.resize == "tile":
            from defectd.pipeline.config import PipelineConfig
            from defectd.pipeline.tiling import axis_positions

            overlap = PipelineConfig().tile_overlap_px
            tiles_per_frame = len(
                axis_positions(max(height, card.input.height), card.input.height, overlap)
            ) * len(axis_positions(max(width, card.input.width), card.input.width, overlap))
        base = {
            "model": str(model),
            "checkpoint": str(ckpt) if ckpt else None,
            "backend": args.backend,
            "precision": precision,
            "batch": args.batch,
            "max_in_flight": args.max_in_flight,
            "mode": args.mode,
            "max_delay_ms": args.max_delay_ms,
            "height": height,
            "width": width,
            "tiles_per_frame": tiles_per_frame,
            "seed": 0,
            "mqtt": mqtt,
            "station": station,
            "workdir": str(workdir),
        }
        if tiles_per_frame > 1:
            base["replay"] = str(workdir / "frames")
            run_worker(
                "render",
                {**base, "frames": frames, "out": base["replay"], "channels": card.input.channels},
            )
        sub = Subscriber(mqtt[0], mqtt[1], station) if mqtt else None
        runs: dict[str, list[dict[str, Any]]] = {
            "engine-only": [],
            "pipeline": [],
            "pipeline-viewers": [],
            "pipeline-tiled": [],
            "simple": [],
            "naive": [],
        }
        loads: list[float] = []  # at the start of each row
        loads_end: list[float] = []  # at its end
        settled: list[float] = []  # seconds waited for the load to fall (--settle)
        steals: list[float | None] = []  # % of CPU time the hypervisor took, per row
        bracket_s = 2.0 if args.quick else 8.0
        naive_frames = 8 if args.quick else max(24, frames // 10)
        for r in range(repeats):
            modes: list[tuple[str, str, dict[str, Any]]] = [
                ("pipeline", "pipeline", {"frames": frames, "bracket_s": bracket_s})
            ]
            if tiles_per_frame > 1:
                # Today's path, model-sized tiles, against full-frame windows; order alternates.
                tiled = {"frames": frames, "bracket_s": 0, "full_frame": False}
                modes.insert(r % 2, ("pipeline-tiled", "pipeline", tiled))
            elif args.viewers:
                # Same seed and frames with the view and its viewers; the order alternates so
                # that a drift in the machine's load favours neither.
                extra = {"frames": frames, "bracket_s": 0, "viewers": args.viewers}
                modes.insert(r % 2, ("pipeline-viewers", "pipeline", extra))
            elif tiles_per_frame == 1:
                # The honest baseline, alternating first and second with the pipeline.
                modes.insert(r % 2, ("simple", "simple", {"frames": frames}))
                if r == 0 and not args.no_naive:
                    modes.append(("naive", "naive", {"frames": naive_frames}))
            for row, mode, extra in modes:
                if args.settle:
                    settled.append(settle(args.settle))
                loads.append(round(os.getloadavg()[0], 2))
                if sub is not None:
                    sub.row = f"{row}-{r}"
                ticks = cpu_ticks()
                result = run_worker(mode, {**base, **extra, "seed": r})
                loads_end.append(round(os.getloadavg()[0], 2))
                steals.append(steal_percent(ticks, cpu_ticks()))
                if sub is not None:
                    time.sleep(0.5)  # the last deliveries
                    result.update(sub.take(f"{row}-{r}", result["frames"]))
                runs[row].append(result)
                if row == "pipeline":
                    runs["engine-only"].append(result.pop("engine_only"))
                print(
                    f"  {row} run {r + 1}/{repeats}: {result['fps']:.2f} frames/s",
                    file=sys.stderr,
                )
        truth = None
        if args.truth:
            truth = run_worker(
                "pipeline",
                {
                    **base,
                    "frames": args.truth,
                    "truth": True,
                    "mqtt": None,
                    "bracket_s": 0,
                    "seed": args.truth_seed,
                },
            )
        if sub is not None:
            sub.close()
    report: dict[str, Any] = {
        "model": model_desc,
        "engine": f"{args.backend}-{precision}",
        "batch": args.batch,
        "frame": f"{width}x{height}",
        "tiles_per_frame": tiles_per_frame,
        "frames": frames,
        "repeats": repeats,
        "mqtt": f"{mqtt[0]}:{mqtt[1]}" if mqtt else None,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "load_avg_1m_per_run": loads,
        "load_avg_1m_end_of_run": loads_end,
        "load_avg_1m_max": max([*loads, *loads_end, round(os.getloadavg()[0], 2)]),
        "steal_percent_per_run": steals,
        "settle": {"below": args.settle, "waited_s": settled} if args.settle else None,
    }
    rows = {name: median_row(rs) for name, rs in runs.items() if rs}
    if rows:
        if mqtt is None:
            rows["pipeline"]["e2e_p50_ms"] = rows["pipeline"]["verdict_p50_ms"]
            rows["pipeline"]["e2e_p99_ms"] = rows["pipeline"]["verdict_p99_ms"]
            if "naive" in rows:
                rows["naive"]["e2e_p50_ms"] = rows["naive"]["puback_p50_ms"]
                rows["naive"]["e2e_p99_ms"] = rows["naive"]["puback_p99_ms"]
        ratios = {
            "pipeline_vs_engine": round(rows["pipeline"]["fps"] / rows["engine-only"]["fps"], 3)
        }
        if "simple" in rows:
            if mqtt is None:
                rows["simple"]["e2e_p50_ms"] = rows["simple"]["verdict_p50_ms"]
                rows["simple"]["e2e_p99_ms"] = rows["simple"]["verdict_p99_ms"]
            ratios["pipeline_vs_simple"] = round(rows["pipeline"]["fps"] / rows["simple"]["fps"], 3)
            p99_pipe, p99_simple = rows["pipeline"]["e2e_p99_ms"], rows["simple"]["e2e_p99_ms"]
            if p99_pipe and p99_simple:
                ratios["p99_pipeline_vs_simple"] = round(p99_pipe / p99_simple, 3)
        if "naive" in rows:
            ratios["pipeline_vs_naive"] = round(rows["pipeline"]["fps"] / rows["naive"]["fps"], 3)
        if "pipeline-tiled" in rows:
            ratios["full_frame_vs_tiled"] = round(
                rows["pipeline"]["fps"] / rows["pipeline-tiled"]["fps"], 3
            )
        if "pipeline-viewers" in rows:
            ratios["viewers_vs_none"] = round(
                rows["pipeline-viewers"]["fps"] / rows["pipeline"]["fps"], 3
            )
        report["engine"] = rows["pipeline"]["engine"]
        report["rows"] = rows
        report["ratios"] = ratios
        stolen = [v for v in report["steal_percent_per_run"] if v is not None]
        report["checks"] = checks(
            ratios, rows, report["load_avg_1m_max"], max(stolen) if stolen else None
        )
    if truth is not None:
        report["truth"] = truth["truth"]
        report["truth_missing"] = truth["missing_verdicts"]
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
