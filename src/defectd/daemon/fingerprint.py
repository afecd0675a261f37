"""The ``config_hash`` stamped on every verdict: a fingerprint of everything that decides it.

Two verdicts with the same model sha256 and the same ``config_hash`` were decided the same way.
So the hash covers, besides ``[pipeline]`` (fit, tiling, deadline), ``[postprocess]``
(thresholds, morphology, zones) and ``[rules]``: the model's backend and precision (they pick
the file and the arithmetic that runs), and per camera the pixels it delivers (output
channels, GenICam node settings), its ROI, ignore zones and calibration file — with the
*contents* of every file these name (calibration JSON, its flat-field gain image, ignore-zone
masks), so an edited calibration changes the hash although the station config did not.
Settings that only move or deliver verdicts (MQTT, outbox, archive, health, timeouts) stay out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defectd.model.card import file_sha256

if TYPE_CHECKING:
    from defectd.daemon.config import StationCamera, StationConfig

# Source settings that shape the pixels the model sees (others only pace or reconnect).
_IMAGE_KEYS = ("type", "channels", "nodes", "height", "width", "pixel_format")


def file_digest(path: Path) -> str:
    """Hex sha256 of a file's bytes, ``missing`` when it cannot be read (the start then fails
    on it with its own error; the fingerprint must not)."""
    try:
        return file_sha256(path)
    except (OSError, ValueError):
        return "missing"


def _calibration_files(path: Path) -> dict[str, str]:
    """The calibration file's digest and that of the flat-field gain image it names."""
    files = {"calibration": file_digest(path)}
    try:
        data = json.loads(path.read_text())
        gain = data.get("flatfield", {}).get("gain_file") if isinstance(data, dict) else None
    except (OSError, ValueError, AttributeError):
        gain = None
    if isinstance(gain, str) and gain:
        files["flatfield_gain"] = file_digest(path.parent / gain)
    return files


def _zones(zones: tuple[Any, ...]) -> list[Any]:
    return [
        {"mask": str(z), "sha256": file_digest(z)} if isinstance(z, Path) else z.model_dump()
        for z in zones
    ]


def _camera(camera: StationCamera) -> dict[str, Any]:
    source = camera.source.model_dump(mode="json")
    return {
        "camera": camera.source.camera,
        "image": {k: source[k] for k in _IMAGE_KEYS if k in source},
        "roi": None if camera.roi is None else camera.roi.model_dump(),
        "ignore_zones": _zones(camera.ignore_zones),
        "calibration": (
            None
            if camera.calibration is None
            else {"path": str(camera.calibration), **_calibration_files(camera.calibration)}
        ),
    }


def decision_fingerprint(config: StationConfig) -> str:
    """First 16 hex digits of the sha256 over everything above, in canonical JSON."""
    post = config.postprocess.model_dump(mode="json")
    post["ignore_zones"] = _zones(config.postprocess.ignore_zones)
    blob = {
        "pipeline": config.pipeline.model_dump(mode="json"),
        "postprocess": post,
        "rules": config.rules.model_dump(mode="json"),
        "model": {"backend": config.model.backend, "precision": config.model.precision},
        "cameras": [_camera(c) for c in config.cameras],
    }
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
