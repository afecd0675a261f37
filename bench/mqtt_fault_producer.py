"""Producer for ``bench/mqtt_faults.py``: the real ``Publisher`` + ``Outbox`` fed with generated
inspections at a steady rate, standing in for the daemon.

Every result id is appended to ``--ids`` right after ``submit`` returned (so after the outbox
commit): the file is the list of results this producer promised to deliver. Each id is one
``os.write`` on an O_APPEND descriptor, which survives a SIGKILL of this process; the file is
also fsynced every 100 ids and at the end (a power cut is not part of this bench, and the
outbox itself commits without fsync by default, ``synchronous = "normal"``).

Restarted with the same ``--outbox`` and ``--ids``, it continues up to ``--total`` ids and first
publishes whatever the killed run left in the outbox. At the end it drains the outbox, stops
cleanly and prints one JSON line of statistics on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from defectd.log import configure_logging
from defectd.pipeline.inspection import Defect, Inspection, Verdict
from defectd.publish import MqttConfig, OutboxConfig, Publisher


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", default="faults")
    ap.add_argument("--station", default="line1")
    ap.add_argument("--outbox", type=Path, required=True)
    ap.add_argument("--ids", type=Path, required=True, help="append-only file of produced ids")
    ap.add_argument("--total", type=int, required=True, help="results to produce in all runs")
    ap.add_argument("--rate", type=float, default=200.0, help="results per second")
    ap.add_argument("--drain-timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    configure_logging("warning", "json")

    done = 0
    if args.ids.exists():
        done = sum(1 for _ in args.ids.open())
    mqtt = MqttConfig(host=args.host, port=args.port, topic_prefix=args.prefix,
                      reconnect_min_s=0.1, reconnect_max_s=1.0)  # fmt: skip
    pub = Publisher(mqtt, OutboxConfig(path=args.outbox), args.station)
    pub.start()
    fd = os.open(args.ids, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    rng = random.Random(done)
    submit_s: list[float] = []
    t0 = time.monotonic()
    for i in range(args.total - done):
        target = t0 + i / args.rate
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        seq = done + i
        u = rng.random()
        verdict = Verdict.PASS if u < 0.9 else Verdict.FAIL if u < 0.98 else Verdict.ERROR
        defects = (
            (Defect(50, (10, 10, 8, 7), (14.0, 13.5), 0.9, 0.7, 0.2),) if verdict == "fail" else ()
        )
        item = Inspection(
            args.station, f"cam{seq % 2}", seq, verdict, defects,
            rule="area>=0.1mm2" if defects else ("error:overload" if verdict == "error" else None),
            reason="queue full" if verdict == "error" else None,
            t_grab_wall=time.time(), latencies_ms={"total": 5.0},
        )  # fmt: skip
        s0 = time.perf_counter()
        pub.submit(item)
        submit_s.append(time.perf_counter() - s0)
        os.write(fd, item.result_id.encode() + b"\n")
        if i % 100 == 99:
            os.fsync(fd)
    os.fsync(fd)
    os.close(fd)
    produced_s = time.monotonic() - t0
    pub.stop(drain_timeout_s=args.drain_timeout)
    stats = pub.stats()
    submit_s.sort()
    out = {
        "produced": len(submit_s),
        "produced_s": round(produced_s, 2),
        "submit_ms_p50": round(statistics.median(submit_s) * 1e3, 4) if submit_s else None,
        "submit_ms_p99": round(submit_s[int(len(submit_s) * 0.99)] * 1e3, 4) if submit_s else None,
        "submit_ms_max": round(submit_s[-1] * 1e3, 4) if submit_s else None,
        **stats.as_dict(),
    }
    print(json.dumps(out), flush=True)
    return 0 if stats.outbox_depth == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
