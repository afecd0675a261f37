"""Pieces of station configs (TOML text) that many daemon tests share."""

from __future__ import annotations

from pathlib import Path


def model_section(model: Path | str) -> str:
    """``[model]`` for a small ONNX model on ONNX Runtime: one thread, one warm-up round
    (tests run beside each other on few cores)."""
    return f'[model]\npath = "{model}"\nbackend = "ort"\nthreads = 1\nwarmup = 1'


# ``[mqtt]`` for a broker that never answers (port 1): results wait in the outbox, and the
# publisher retries quickly; ``[health]`` off (no port to pick).
NO_BROKER_NO_HEALTH = """[mqtt]
port = 1
reconnect_min_s = 0.5
reconnect_max_s = 1
connect_timeout_s = 1
[health]
enabled = false"""
