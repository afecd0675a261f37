"""Training step time of the U-Net on this CPU: float32 vs channels-last vs bfloat16 autocast.

One step = forward, BCE + Dice loss, backward, AdamW update, on a random batch. The modes are
timed round-robin (one step of each per round), so load from other processes on the machine
falls on every mode alike and the ratios against ``fp32`` hold within one run; the median
over rounds is reported.

    python bench/train_step.py [--quick] [--json] [--base 16] [--size 256] [--batch 8]
        [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

# Spinning OpenMP workers distort timings on a shared machine (see defectd train).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from _common import print_rows
from defectd.log import configure_logging
from defectd.model.unet import UNet, UNetConfig
from defectd.training.losses import SegLoss
from defectd.training.train import bf16_supported, channels_last

MODES = ("fp32", "fp32-channels-last", "bf16-channels-last")


def make_step(mode: str, base: int, size: int, batch: int) -> Any:
    torch.manual_seed(0)
    net = UNet(UNetConfig(base=base, depth=4))
    cl = mode.endswith("channels-last")
    if cl:
        net = channels_last(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = SegLoss()
    x = torch.randn(batch, 1, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.97).float()
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    bf16 = mode.startswith("bf16")

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def main() -> None:
    configure_logging("warning", stream=sys.stderr)  # stdout carries the results only
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="small batch, 4 rounds (< 60 s)")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.rounds, args.size = 4, 4, 192
    torch.set_num_threads(args.threads)
    modes = [m for m in MODES if bf16_supported() or not m.startswith("bf16")]
    steps = {m: make_step(m, args.base, args.size, args.batch) for m in modes}
    for m in modes:  # warm-up: oneDNN builds its kernels on the first call
        steps[m]()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m in modes:
            times[m].append(steps[m]())
    base_s = statistics.median(times["fp32"])
    rows = []
    for m in modes:
        med = statistics.median(times[m])
        rows.append(
            {
                "mode": m,
                "s_per_step": round(med, 4),
                "images_per_s": round(args.batch / med, 2),
                "speedup_vs_fp32": round(base_s / med, 2),
            }
        )
    setup = {k: getattr(args, k) for k in ("base", "size", "batch", "threads", "rounds")}
    if args.json:
        print(json.dumps({"setup": setup, "bf16_supported": bf16_supported(), "rows": rows}))
        return
    print(
        f"U-Net base {args.base}, 1x{args.size}x{args.size}, batch {args.batch}, "
        f"{args.threads} threads, median of {args.rounds} rounds"
    )
    print_rows(
        ["mode", "s/step", "img/s", "x fp32"],
        "{mode:<22}{s_per_step:>10.3f}{images_per_s:>10.1f}{speedup_vs_fp32:>10.2f}",
        rows,
    )


if __name__ == "__main__":
    main()
