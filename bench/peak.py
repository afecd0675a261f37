"""The CPU's measured peak per precision: large matrix products, fp32 / bf16 / int8.

For each precision the best of several libraries (numpy and torch where they have a kernel,
OpenVINO's MatMul compiled for that precision; int8 as OpenVINO FakeQuantize -> MatMul and
``torch._int_mm``), each the shortest of repeated ``n x n`` products over about ``--seconds``,
on ``--threads`` threads (default: every core). int8 is in GOP/s (multiply and add counted as
two operations, as for FLOP/s). ``bench/engines.py`` divides each engine row's GFLOP/s by the
peak of its precision measured here ("of peak").

The best of repeated short runs is the figure least disturbed by other work on the machine,
but on a loaded machine it still reads low: name the load (printed) beside every figure.

    python bench/peak.py [--json] [--quick] [--threads 2] [--n 2048] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Any

import numpy as np

from _common import cpu_model


def _best(fn: Any, seconds: float) -> float:
    """Shortest of at least two calls (the first warms caches) within about ``seconds``."""
    fn()
    best = float("inf")
    end = time.perf_counter() + seconds
    while best == float("inf") or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _ov_matmul(n: int, precision: str, threads: int) -> Any:
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints
    from openvino import opset13 as ops

    x = ops.parameter([n, n], ov.Type.f32, name="x")
    w = ops.constant(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
    if precision == "int8":
        lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
        x_q = ops.fake_quantize(x, lo, hi, lo, hi, 256)
        w_q = ops.fake_quantize(w, lo, hi, lo, hi, 255)
        y = ops.matmul(x_q, w_q, False, False)
    else:
        y = ops.matmul(x, w, False, False)
    model = ov.Model([y], [x])
    hint = ov.Type.bf16 if precision == "bf16" else ov.Type.f32
    compiled = ov.Core().compile_model(
        model,
        "CPU",
        {
            hints.inference_precision: hint,
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            props.inference_num_threads: threads,
        },
    )
    request = compiled.create_infer_request()
    data = np.random.default_rng(1).uniform(-3, 3, size=(n, n)).astype(np.float32)
    return lambda: request.infer({0: data}, share_inputs=True, share_outputs=True)


class PeakProbe:
    """Large matrix products per precision and library; runners are built once."""

    def __init__(self, threads: int, n: int = 2048) -> None:
        import torch

        torch.set_num_threads(threads)
        self.flop = 2.0 * n**3 / 1e9
        a = np.random.default_rng(0).random((n, n), dtype=np.float32)
        t32 = torch.from_numpy(a)
        t16 = t32.to(torch.bfloat16)
        i8 = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        self.runners: dict[str, dict[str, Any]] = {
            "fp32": {"numpy": lambda: a @ a, "torch": lambda: t32 @ t32},
            "bf16": {"torch": lambda: t16 @ t16},
            "int8": {},
        }
        with contextlib.suppress(RuntimeError):  # no int8 matmul kernel in this torch build
            torch._int_mm(i8, i8)
            self.runners["int8"]["torch_int_mm"] = lambda: torch._int_mm(i8, i8)
        for precision in ("fp32", "bf16", "int8"):
            with contextlib.suppress(Exception):  # a precision this CPU cannot run
                self.runners[precision]["openvino"] = _ov_matmul(n, precision, threads)

    def measure(self, seconds: float) -> dict[str, Any]:
        found = {
            precision: {lib: self.flop / _best(fn, seconds) for lib, fn in libs.items()}
            for precision, libs in self.runners.items()
        }
        return {"by_library": found}


def merge_peaks(probes: list[dict[str, Any]]) -> dict[str, Any]:
    """Best GFLOP/s per precision and library over all probes."""
    by_library: dict[str, dict[str, float]] = {}
    for probe in probes:
        for precision, libs in probe["by_library"].items():
            slot = by_library.setdefault(precision, {})
            for lib, value in libs.items():
                slot[lib] = max(slot.get(lib, 0.0), value)
    gflops = {p: max(libs.values(), default=0.0) for p, libs in by_library.items()}
    return {"gflops": gflops, "by_library": by_library, "probes": len(probes)}


def measure_peak(threads: int, n: int, rounds: int, seconds: float) -> dict[str, Any]:
    """``rounds`` probes of every runner, merged (best per precision), with the machine."""
    load_before = os.getloadavg()[0]
    probe = PeakProbe(threads, n)
    peak = merge_peaks([probe.measure(seconds) for _ in range(rounds)])
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "n": n,
        "rounds": rounds,
        "seconds_per_probe": seconds,
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "peak_gflops": {k: round(v, 1) for k, v in peak["gflops"].items()},
        "by_library": {
            k: {lib: round(v, 1) for lib, v in libs.items()}
            for k, libs in peak["by_library"].items()
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    p.add_argument("--n", type=int, default=2048, help="matrix size (n x n)")
    p.add_argument("--rounds", type=int, default=3, help="probes of every runner (best kept)")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per probe and runner")
    p.add_argument("--quick", action="store_true", help="2 rounds of 0.5 s (about 10 s)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.seconds = 2, 0.5
    result = measure_peak(args.threads, args.n, args.rounds, args.seconds)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['cpu']}, {result['threads']} threads, {args.n}x{args.n} products, best of "
        f"{args.rounds} probes; load average (1 min) before/after {result['load_avg_1m']}"
    )
    for precision, value in result["peak_gflops"].items():
        unit = "GOP/s" if precision == "int8" else "GFLOP/s"
        libs = ", ".join(f"{lib} {v}" for lib, v in result["by_library"][precision].items())
        print(f"peak {precision}: {value} {unit}  ({libs})")


if __name__ == "__main__":
    main()
