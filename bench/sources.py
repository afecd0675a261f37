"""What grabbing through the camera sources costs.

GenICam rows (viky.cti, the simulated producer bundled with genicam): frames/s grabbed through
``GenICamSource`` at 640x480 against the producer's set rate (200 fps); CPU time per frame of
the grab thread alone and of the whole process (process CPU / frames: it includes the simulated
camera rendering its images, not the bystander); and how much a bystander Python thread still
gets done meanwhile (its 1 ms sleep-loop iterations as a share of those with no camera). The
baseline, measured in the same run, is the plain harvesters loop most code starts from:
``with ia.fetch(timeout=1.0) as buffer: copy`` with harvesters' default 1 ms internal wait.
The GenTL wait holds the GIL, which is why the source polls instead.

Synthetic rows: parts/s of the unthrottled synthetic line (its consumer does nothing).
Each figure is the median over ``--repeats`` runs.

    python bench/sources.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from _common import print_rows
from defectd.log import configure_logging
from defectd.pipeline.frame import Frame
from defectd.pipeline.sources import DeviceSelector, GenICamSourceConfig, SyntheticSourceConfig
from defectd.pipeline.sources.genicam import GenICamSource
from defectd.pipeline.sources.gentl import GenTLHub, apply_nodes, bundled_producer
from defectd.pipeline.sources.synthetic import SyntheticSource

SET_RATE = 200.0


def vga(pixel_format: str) -> dict[str, Any]:
    return {
        "Width": 640,
        "Height": 480,
        "PixelFormat": pixel_format,
        "AcquisitionFrameRate": SET_RATE,
    }


class Bystander:
    """A Python thread sleeping 1 ms per iteration; counts how often it gets to run."""

    def __init__(self) -> None:
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-bystander", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.ticks += 1
            time.sleep(0.001)

    @property
    def native_id(self) -> int | None:
        return self._thread.native_id

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def thread_cpu_s(native_id: int | None) -> float:
    for t in psutil.Process().threads():
        if t.id == native_id:
            return float(t.user_time + t.system_time)
    return 0.0


def measure(run: Callable[[threading.Event], int | None], seconds: float) -> dict[str, float]:
    """Run ``run(stop)`` in a thread for ``seconds`` (after a warm-up); it returns its frames."""
    stop = threading.Event()
    result: list[int | None] = []
    worker = threading.Thread(target=lambda: result.append(run(stop)), name="bench-grab")
    worker.start()
    time.sleep(0.3)  # warm-up: device opened and streaming
    proc = psutil.Process()
    with Bystander() as bystander:
        cpu0 = proc.cpu_times()
        b0 = thread_cpu_s(bystander.native_id)
        t0 = time.perf_counter()
        time.sleep(seconds)
        wall = time.perf_counter() - t0
        cpu1 = proc.cpu_times()
        bystander_cpu = thread_cpu_s(bystander.native_id) - b0
        ticks = bystander.ticks
    stop.set()
    worker.join()
    frames = result[0] if result else None
    assert frames is not None
    # The bystander's own CPU is not the camera's: leave it out.
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system) - bystander_cpu
    return {"wall": wall, "process_cpu_s": cpu, "frames": float(frames), "ticks": float(ticks)}


def grab_through_source(pixel_format: str, channels: int, seconds: float) -> dict[str, float]:
    config = GenICamSourceConfig(
        camera="bench",
        producers=(bundled_producer(),),
        device=DeviceSelector(serial="0"),
        nodes=vga(pixel_format),
        channels=channels,
    )
    counts = {"frames": 0}
    windows: dict[str, float] = {}

    def on_frame(_frame: Frame) -> None:
        counts["frames"] += 1

    def run(stop: threading.Event) -> int:
        source = GenICamSource(config, "bench")
        source.start(on_frame)
        thread = source._thread  # the grab thread, for its own CPU time
        native = thread.native_id if thread is not None else None
        time.sleep(0.25)
        f0, c0 = counts["frames"], thread_cpu_s(native)
        stop.wait()
        windows["thread_cpu_s"] = thread_cpu_s(native) - c0
        frames = counts["frames"] - f0
        source.stop()
        return frames

    out = measure(run, seconds)
    out["thread_cpu_s"] = windows["thread_cpu_s"]
    return out


def grab_plain_harvesters(pixel_format: str, channels: int, seconds: float) -> dict[str, float]:
    del channels  # the baseline copies the raw buffer as is
    from harvesters.core import Harvester

    windows: dict[str, float] = {}

    def run(stop: threading.Event) -> int:
        harvester = Harvester()
        harvester.add_file(str(bundled_producer()))
        harvester.update()
        ia = harvester.create({"serial_number": "0"})
        apply_nodes(ia.remote_device.node_map, vga(pixel_format), "bench")
        ia.num_buffers = 8
        ia.start()
        native = threading.get_native_id()
        frames = 0
        started = time.perf_counter()
        c0 = None
        while not stop.is_set():
            with ia.fetch(timeout=1.0) as buffer:
                buffer.payload.components[0].data.copy()
            if c0 is None and time.perf_counter() - started > 0.25:
                c0 = thread_cpu_s(native)
                frames = 0
            frames += 1
        windows["thread_cpu_s"] = thread_cpu_s(native) - (c0 or 0.0)
        ia.destroy()
        harvester.reset()
        return frames

    out = measure(run, seconds)
    out["thread_cpu_s"] = windows["thread_cpu_s"]
    return out


def idle_ticks(seconds: float) -> float:
    with Bystander() as bystander:
        time.sleep(seconds)
    return bystander.ticks / seconds


def synthetic_rate(size: int, parts: int) -> float:
    config = SyntheticSourceConfig(
        camera="bench", rate_hz=None, height=size, width=size, defect_rate=0.3, count=parts
    )
    done = threading.Event()
    source = SyntheticSource(config, "bench")
    first: list[int] = []
    last: list[int] = []

    def on_frame(frame: Frame) -> None:
        if not first:
            first.append(frame.t_host_ns)
        last[:] = [frame.t_host_ns]

    source.start(on_frame, lambda e: done.set() if e.kind == "end_of_stream" else None)
    done.wait(120)
    source.stop()
    return (parts - 1) / ((last[0] - first[0]) / 1e9)


def run(quick: bool, repeats: int) -> dict[str, Any]:
    seconds = 1.0 if quick else 3.0
    hub = GenTLHub([bundled_producer()])  # fail early and clearly if viky does not load
    hub.close()
    baseline_ticks = statistics.median(idle_ticks(0.5) for _ in range(repeats))
    rows: list[dict[str, Any]] = []
    cases = [("Mono8", 1), ("RGBa8", 3)]
    for pixel_format, channels in cases:
        for name, fn in (
            ("plain harvesters fetch", grab_plain_harvesters),
            ("GenICamSource", grab_through_source),
        ):
            runs = [fn(pixel_format, channels, seconds) for _ in range(repeats)]
            fps = statistics.median(r["frames"] / r["wall"] for r in runs)
            rows.append(
                {
                    "what": name,
                    "format": f"{pixel_format}->{channels}ch",
                    "fps": fps,
                    "fps_vs_set_rate": fps / SET_RATE,
                    "thread_cpu_ms_per_frame": statistics.median(
                        1000 * r["thread_cpu_s"] / r["frames"] for r in runs
                    ),
                    "process_cpu_ms_per_frame": statistics.median(
                        1000 * r["process_cpu_s"] / r["frames"] for r in runs
                    ),
                    "bystander_share": statistics.median(
                        r["ticks"] / r["wall"] / baseline_ticks for r in runs
                    ),
                }
            )
    parts = 100 if quick else 400
    synthetic = [
        {
            "size": size,
            "parts_per_s": statistics.median(synthetic_rate(size, parts) for _ in range(repeats)),
        }
        for size in (256, 512)
    ]
    return {
        "set_rate_fps": SET_RATE,
        "bystander_idle_ticks_per_s": baseline_ticks,
        "genicam": rows,
        "synthetic": synthetic,
        "cpu_count": psutil.cpu_count(),
        "load_avg_1m": psutil.getloadavg()[0],
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"viky.cti, 640x480, set rate {result['set_rate_fps']:.0f} fps; "
        f"load {result['load_avg_1m']:.2f} on {result['cpu_count']} CPUs"
    )
    print_rows(
        ["what", "format", "fps", "of set", "thread ms/f", "process ms/f", "bystander"],
        "{what:<24}{format:<13}{fps:>7.1f}{fps_vs_set_rate:>8.0%}{thread_cpu_ms_per_frame:>13.3f}"
        "{process_cpu_ms_per_frame:>14.3f}{bystander_share:>11.0%}",
        result["genicam"],
        rule=True,
    )
    print()
    print("synthetic line, unthrottled (grey, 30% defective)")
    for s in result["synthetic"]:
        print(f"  {s['size']}x{s['size']}: {s['parts_per_s']:.0f} parts/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (< 60 s)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    args = parser.parse_args()
    configure_logging("warning", "json")
    result = run(args.quick, args.repeats)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
