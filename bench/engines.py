"""Inference engines on this machine: frames/s, batch latency, peak RSS, fraction of peak FLOP/s.

Rows: torch-fp32 (eager reference), ort-fp32, ort-int8, openvino-fp32, openvino-bf16,
openvino-int8 at batch 1/4/8/16. Each backend runs in its own worker process (so its peak
RSS is its own); the workers are driven round-robin, one at a time, so that load from other
processes on the machine spreads over every backend alike and ratios within one run hold.

The model is ``models/magnetic_tile/model.onnx`` when present, else a freshly initialised
U-Net of the same architecture (base 16, depth 4, 1x256x256) exported to a temp dir; speed does
not depend on the weights. INT8 rows quantise it first (``quantize_qdq``, min/max, synthetic
parts). Peak FLOP/s is measured with large matrix products per precision (numpy/torch/OpenVINO),
probed between engine rounds (once per batch size) and the best kept, so ``fraction_of_peak``
says how close each row gets to what the cores can do.

    python bench/engines.py [--quick] [--json] [--model M] [--batches 1,4,8,16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import cpu_model, print_rows
from peak import PeakProbe, merge_peaks

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "magnetic_tile" / "model.onnx"
ROWS = ("torch-fp32", "ort-fp32", "ort-int8", "openvino-fp32", "openvino-bf16", "openvino-int8")
FALLBACK_ARCH = {"in_channels": 1, "base": 16, "depth": 4}
FALLBACK_SIZE = 256


# --- model preparation (main process) -------------------------------------------------------


def synthetic_batches(card: Any, n_batches: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Normalised ``(batch, C, H, W)`` float32 batches of noisy parts with bright/dark spots."""
    rng = np.random.default_rng(seed)
    c, h, w = card.input.channels, card.input.height, card.input.width
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n_batches):
        img = rng.normal(120, 25, size=(batch, c, h, w)).astype(np.float32)
        for i in range(batch):
            for _ in range(rng.integers(0, 4)):
                cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.uniform(2, h / 12)
                img[i, :, (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += rng.choice([-80, 80])
        out.append(card.normalisation.apply(np.clip(img, 0, 255)))
    return out


def dataset_batches(data: Path, card: Any, split: str, limit: int | None = None) -> Any:
    """``(normalised (1, C, H, W) batch, original (H, W), mask (H, W) uint8)`` per sample."""
    from defectd.data.datasets import open_dataset
    from defectd.model.fit import fit_to_input

    ds = open_dataset(data)
    samples = ds.samples(split)[:limit] if limit else ds.samples(split)
    c, h, w = card.input.channels, card.input.height, card.input.width
    for sample in samples:
        image = ds.load_image(sample, c)
        mask = ds.load_mask(sample, image.shape[:2])
        fitted, _ = fit_to_input(image, None, h, w, card.input.resize)
        chw = fitted[None] if fitted.ndim == 2 else fitted.transpose(2, 0, 1)
        yield card.normalisation.apply(chw)[None], image.shape[:2], mask


def prepare_models(
    model: Path | None, workdir: Path, calibration_data: Path | None = None
) -> dict[str, Any]:
    """fp32 ONNX (given or fallback), its INT8 QDQ copy, the architecture and GFLOPs/frame.

    INT8 is calibrated on 128 training images of ``calibration_data`` when given (fewer cost
    Dice: 32 images lost 0.028 on magnetic-tile val, 128 lost 0.002), else on synthetic parts
    (speed does not depend on it; accuracy does)."""
    from defectd.calibration.int8 import quantize_qdq
    from defectd.model import ModelCard, UNet, UNetConfig, load_card
    from defectd.model.export import export_onnx

    if model is None and DEFAULT_MODEL.is_file():
        model = DEFAULT_MODEL
    if model is not None:
        card = load_card(model)
        fields = set(UNetConfig.__dataclass_fields__)
        arch = {k: v for k, v in card.architecture.items() if k in fields} or FALLBACK_ARCH
        source = str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model)
        fp32 = workdir / "model.onnx"
        fp32.write_bytes(model.read_bytes())
        card.save(workdir / "model.card.json")
    else:
        arch = dict(FALLBACK_ARCH)
        size = FALLBACK_SIZE
        card = ModelCard(
            name="bench-unet",
            architecture=arch,
            input={"channels": arch["in_channels"], "height": size, "width": size},
        )
        fp32 = workdir / "model.onnx"
        card = export_onnx(UNet(UNetConfig(**arch)).eval(), card, fp32)
        source = f"fresh U-Net {arch} {size}x{size} (models/magnetic_tile not present)"
    net = UNet(UNetConfig(**arch))
    members = int(card.architecture.get("members", 1))  # a seed ensemble runs them all
    gflops = members * net.gflops(card.input.height, card.input.width)
    t0 = time.perf_counter()
    shipped = model.with_name(model.stem + ".int8.onnx") if model is not None else None
    if shipped is not None and shipped.is_file() and calibration_data is None:
        # The INT8 model the station runs (calibrated on real images), not a stand-in.
        (workdir / "model.int8.onnx").write_bytes(shipped.read_bytes())
        shipped_card = shipped.with_name(shipped.stem + ".card.json")
        if shipped_card.is_file():
            (workdir / "model.int8.card.json").write_bytes(shipped_card.read_bytes())
        source += f" (int8: {shipped.name})"
    else:
        calibration: Any = synthetic_batches(card, 4, 2)
        if calibration_data is not None:
            calibration = (b for b, _, _ in dataset_batches(calibration_data, card, "train", 128))
        quantize_qdq(fp32, workdir / "model.int8.onnx", calibration)
    return {
        "model": fp32,
        "source": source,
        "arch": arch,
        "members": members,
        "input": [card.input.channels, card.input.height, card.input.width],
        "gflops_per_frame": gflops,
        "quantize_s": time.perf_counter() - t0,
    }


# --- backend worker ----------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """Open one engine, then answer ``{"batch": n, "iters": k}`` lines with timings."""
    if args.worker == "peak":
        # Probed once per round like the engines, so that background load weighs alike.
        probe = PeakProbe(args.threads)
        print(json.dumps({"ready": "peak", "open_s": 0.0}), flush=True)
        for line in sys.stdin:
            if json.loads(line).get("quit"):
                break
            print(json.dumps(probe.measure(args.peak_seconds)), flush=True)
        print(json.dumps({"rss_mb": peak_rss_mb()}), flush=True)
        return
    backend, precision = args.worker.split("-")
    model = Path(args.model)
    t0 = time.perf_counter()
    if backend == "torch":
        import torch

        from defectd.engines.model_file import make_spec
        from defectd.engines.torch_backend import TorchEngine
        from defectd.model import UNet, UNetConfig, load_card

        card = load_card(model)
        arch = json.loads(args.arch)
        spec = make_spec(model, card, None, 1, args.max_batch)
        torch.manual_seed(0)
        nets = [UNet(UNetConfig(**arch)) for _ in range(int(card.architecture.get("members", 1)))]
        engine: Any = TorchEngine(nets, card, spec, threads=args.threads)
    else:
        from defectd.engines import open_engine

        engine = open_engine(
            model, backend=backend, precision=precision, max_batch=args.max_batch,
            threads=args.threads,
        )  # fmt: skip
    open_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    chw = engine.spec.chw
    inputs: dict[int, np.ndarray] = {}
    # As many callers as the engine runs requests in parallel (OpenVINO in throughput mode:
    # one per CPU stream), as the pipeline's inference threads call it: its ceiling.
    from defectd.engines.base import engine_concurrency

    callers = engine_concurrency(engine)
    lock = threading.Lock()
    print(json.dumps({"ready": engine.name, "open_s": open_s, "callers": callers}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        n = int(cmd["batch"])
        if n not in inputs:
            inputs[n] = rng.normal(size=(n, *chw)).astype(np.float32)
            engine.infer(inputs[n])  # first call at a new shape: kernels, caches
        times: list[float] = []

        def calls(k: int, x: np.ndarray, out: list[float]) -> None:
            for _ in range(k):
                t = time.perf_counter()
                engine.infer(x)
                with lock:
                    out.append(time.perf_counter() - t)

        threads = [
            threading.Thread(target=calls, args=(int(cmd["iters"]), inputs[n], times))
            for _ in range(callers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(json.dumps({"times": times}), flush=True)
    engine.close()
    print(json.dumps({"rss_mb": peak_rss_mb()}), flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident set size. ``VmHWM`` starts afresh at exec, unlike
    ``getrusage``'s ``ru_maxrss``, which a child inherits from its parent across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Worker:
    """A backend worker process and its line protocol."""

    def __init__(self, name: str, model: Path, arch: dict[str, Any], args: argparse.Namespace):
        cmd = [
            sys.executable, __file__, "--worker", name, "--model", str(model),
            "--arch", json.dumps(arch), "--threads", str(args.threads),
            "--max-batch", str(max(args.batch_list)), "--peak-seconds", str(args.peak_seconds),
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.name = name
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env,
        )  # fmt: skip
        self.ready: dict[str, Any] = {}
        self.times: dict[int, list[float]] = {}

    def wait_ready(self) -> None:
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: worker exited (rc {self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, batch: int, iters: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"batch": batch, "iters": iters}) + "\n")
        self.proc.stdin.flush()
        self.times.setdefault(batch, []).extend(self._read()["times"])

    def probe(self) -> dict[str, Any]:
        """One peak measurement (the ``peak`` worker only)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("{}\n")
        self.proc.stdin.flush()
        return self._read()

    def finish(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
        self.proc.stdin.flush()
        rss = float(self._read()["rss_mb"])
        self.proc.wait(timeout=30)
        return rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="fp32 ONNX with its card (default: magnetic_tile)")
    p.add_argument(
        "--quick", action="store_true", help="batches 1 and 8, 2 rounds of 1 run (< 60 s)"
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--batches", default="1,4,8,16", help="comma-separated batch sizes")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds per batch size")
    p.add_argument("--seconds", type=float, default=1.0, help="target seconds per measurement")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="seconds per peak probe")
    p.add_argument(
        "--dice",
        type=Path,
        metavar="DATA",
        help="dataset folder: calibrate INT8 on 128 train images and report defect Dice\n"
        "of fp32 and each low-precision row on --split (e.g. magnetic_tile)",
    )
    p.add_argument("--split", default="val", help="split for --dice (default val)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--arch", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--max-batch", type=int, default=16, help=argparse.SUPPRESS)
    args = p.parse_args()
    from defectd.log import configure_logging

    configure_logging("warning", "json", sys.stderr)  # stdout carries results only
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.batches, args.rounds, args.seconds, args.peak_seconds = "1,8", 2, 0.0, 0.25
    args.batch_list = [int(b) for b in args.batches.split(",")]
    rows = [r for r in args.rows.split(",") if r]
    t_start = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="defectd-bench-") as tmp:
        info = prepare_models(args.model, Path(tmp), args.dice)
        t_prepared = time.perf_counter()
        workers = [Worker(name, info["model"], info["arch"], args) for name in rows]
        peak_worker = Worker("peak", info["model"], info["arch"], args)
        for w in [*workers, peak_worker]:  # started together, they load in parallel
            w.wait_ready()
        probes = []
        t_started = time.perf_counter()
        # Round-robin: every backend measured once per round, so drifting background load
        # hits each of them the same way.
        for batch in args.batch_list:
            iters = {w.name: 1 for w in workers}
            for w in workers:  # calibrate iterations to about --seconds per measurement
                if args.seconds <= 0:
                    break
                w.run(batch, 1)
                per_call = w.times[batch][-1]
                iters[w.name] = max(1, min(50, round(args.seconds / max(per_call, 1e-4))))
                w.times[batch].clear()
            for i in range(args.rounds):
                for w in workers:
                    w.run(batch, iters[w.name])
                if i == args.rounds // 2 and not (args.quick and probes):
                    probes.append(peak_worker.probe())  # one per batch size (quick: one)
        rss = {w.name: w.finish() for w in workers}
        peak_worker.finish()
        peak = merge_peaks(probes)
        dice = dice_check(info["model"], args.dice, args.split, args.threads) if args.dice else None
        opened = {w.name: w.ready["open_s"] for w in workers}
        results = []
        for w in workers:
            precision = w.name.split("-")[1]
            peak_gflops = peak["gflops"].get(precision) or peak["gflops"]["fp32"]
            for batch in args.batch_list:
                times = np.asarray(w.times[batch])
                p50 = float(np.median(times))
                fps = batch * w.ready.get("callers", 1) / p50  # callers in parallel
                gflops_s = fps * info["gflops_per_frame"]
                results.append(
                    {
                        "name": w.name,
                        "batch": batch,
                        "fps": round(fps, 2),
                        "p50_ms": round(p50 * 1e3, 2),
                        "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 2),
                        "runs": int(times.size),
                        "rss_mb": round(rss[w.name], 1),
                        "gflops_per_frame": round(info["gflops_per_frame"], 3),
                        "gflops_s": round(gflops_s, 1),
                        "peak_gflops": round(peak_gflops, 1),
                        "fraction_of_peak": round(gflops_s / peak_gflops, 3),
                        "open_s": round(opened[w.name], 2),
                    }
                )
    base = {r["batch"]: r["fps"] for r in results if r["name"] == "torch-fp32"}
    for r in results:
        r["x_torch"] = round(r["fps"] / base[r["batch"]], 2) if r["batch"] in base else None
    summary = {
        "model": info["source"],
        "input": info["input"],
        "members": info["members"],
        "threads": args.threads,
        "cpu": cpu_model("unknown"),
        "peak_gflops": {k: round(v, 1) for k, v in peak["gflops"].items()},
        "peak_probes": peak["probes"],
        "peak_by_library": {
            k: {lib: round(v, 1) for lib, v in libs.items()}
            for k, libs in peak["by_library"].items()
        },
        "quantize_s": round(info["quantize_s"], 2),
        "seconds": round(time.perf_counter() - t_start, 1),
        "stage_s": {
            "prepare": round(t_prepared - t_start, 1),
            "start_workers": round(t_started - t_prepared, 1),
            "measure": round(time.perf_counter() - t_started, 1),
        },
        "rows": results,
        "best_of_peak": best_of_peak(results),
        "load_avg_1m": [load_start, round(os.getloadavg()[0], 2)],
        "checks": checks(results),
        "dice": dice,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(summary)


def dice_check(model: Path, data: Path, split: str, threads: int) -> dict[str, Any]:
    """Defect-pixel Dice on ``split`` for fp32 and every low-precision row (card threshold)."""
    from defectd.data.metrics import dice_score
    from defectd.engines import open_engine
    from defectd.model import load_card
    from defectd.model.fit import restore_size

    card = load_card(model)
    result: dict[str, Any] = {"split": split, "threshold": card.threshold}
    for name in ("openvino-fp32", "ort-int8", "openvino-bf16", "openvino-int8"):
        backend, precision = name.split("-")
        engine = open_engine(model, backend=backend, precision=precision, threads=threads)
        tp = fp = fn = 0
        for batch, shape, mask in dataset_batches(data, card, split):
            prob = restore_size(engine.infer(batch)[0, 0], shape, card.input.resize)
            pred = prob > card.threshold
            truth = mask > 0
            tp += int(np.count_nonzero(pred & truth))
            fp += int(np.count_nonzero(pred & ~truth))
            fn += int(np.count_nonzero(~pred & truth))
        engine.close()
        result[name] = round(dice_score(tp, fp, fn), 4)
    for name in ("ort-int8", "openvino-bf16", "openvino-int8"):
        result[f"{name}_minus_fp32"] = round(result[name] - result["openvino-fp32"], 4)
    return result


def best_of_peak(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row name, the batch size that came closest to its precision's measured peak."""
    best: dict[str, Any] = {}
    for r in rows:
        if r["name"] not in best or r["fraction_of_peak"] > best[r["name"]]["fraction_of_peak"]:
            best[r["name"]] = {
                "precision": r["name"].split("-")[1],
                "batch": r["batch"],
                "fraction_of_peak": r["fraction_of_peak"],
                "gflops_s": r["gflops_s"],
                "peak_gflops": r["peak_gflops"],
            }
    return best


def checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ratios the engines issue asks for, from this run's rows."""
    fps = {(r["name"], r["batch"]): r["fps"] for r in rows}
    out: dict[str, Any] = {}
    batches = sorted({r["batch"] for r in rows})
    if any(n == "torch-fp32" for n, _ in fps) and any(n == "ort-fp32" for n, _ in fps):
        out["ort_fp32_vs_torch"] = {
            b: round(fps[("ort-fp32", b)] / fps[("torch-fp32", b)], 2) for b in batches
        }
    at = 8 if 8 in batches else batches[-1]
    low = [n for n in ("openvino-bf16", "openvino-int8") if (n, at) in fps]
    if low:
        best = max(low, key=lambda n: fps[(n, at)])
        out["best_low_precision_openvino"] = {"name": best, "batch": at, "fps": fps[(best, at)]}
        if ("torch-fp32", at) in fps:
            out["best_low_precision_openvino"]["x_torch_fp32"] = round(
                fps[(best, at)] / fps[("torch-fp32", at)], 2
            )
        if ("ort-int8", at) in fps:
            out["best_low_precision_openvino"]["x_ort_int8"] = round(
                fps[(best, at)] / fps[("ort-int8", at)], 2
            )
    return out


def print_table(summary: dict[str, Any]) -> None:
    members = f"  members {summary['members']}" if summary["members"] > 1 else ""
    print(
        f"model: {summary['model']}  input {summary['input']}{members}  "
        f"threads {summary['threads']}"
    )
    print(f"cpu: {summary['cpu']}")
    pk = summary["peak_gflops"]
    print(f"measured peak GFLOP/s: fp32 {pk['fp32']}, bf16 {pk['bf16']}, int8 {pk['int8']} (GOP/s)")
    heads = ["name", "batch", "fps", "x torch", "p50 ms", "p99 ms", "RSS MB", "GF/frame"]
    print_rows(
        [*heads, "GFLOP/s", "of peak"],
        "{name:<15}{batch:>6}{fps:>9.2f}{x_torch:>9.2f}{p50_ms:>10.1f}{p99_ms:>10.1f}{rss_mb:>9.0f}"
        "{gflops_per_frame:>10.2f}{gflops_s:>9.1f}{fraction_of_peak:>9.0%}",
        [{**r, "x_torch": r["x_torch"] or 0} for r in summary["rows"]],
        rule=True,
    )
    int8 = summary["best_of_peak"].get("openvino-int8")
    if int8 is not None:
        print(
            f"openvino-int8 of the measured int8 peak: {int8['fraction_of_peak']:.0%} "
            f"(target >= 55%: {'met' if int8['fraction_of_peak'] >= 0.55 else 'not met'}; "
            f"peak {summary['peak_gflops']['int8']} GOP/s)"
        )
    for name, best in summary["best_of_peak"].items():
        print(
            f"{name}: best {best['fraction_of_peak']:.0%} of the measured {best['precision']} "
            f"peak ({best['gflops_s']} of {best['peak_gflops']} G(FL)OP/s, batch {best['batch']})"
        )
    print(f"load average (1 min) at start / end: {summary['load_avg_1m']}")
    print(f"checks: {json.dumps(summary['checks'])}")
    if summary["dice"]:
        print(f"dice: {json.dumps(summary['dice'])}")
    print(f"total {summary['seconds']} s, stages {summary['stage_s']}")


if __name__ == "__main__":
    main()
