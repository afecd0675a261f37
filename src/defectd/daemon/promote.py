"""Gated promotion: a candidate that ran in shadow becomes the live model only through its gates.

``defectd promote`` reads a shadow report (``defectd shadow report --json``, the JSON contract
in docs/lifecycle.md), checks the gates of ``[promotion]``, and only when every gate holds
installs the candidate and asks the daemon to reload; every attempt, passed or refused, is an
entry in the audit log with the report as evidence.

Gates (``evaluate_gates``):

* ``same_models`` — the report compares the candidate file about to be installed (sha256)
  against the live model now configured (its file sha256, or the sha256 the daemon last
  recorded as executed): a report about other models proves nothing about this swap;
* ``min_parts`` — at least this many parts compared (both verdicts pass or fail);
* ``min_agreement`` — verdict agreement over those parts;
* ``no_new_escapes`` — among the disagreements with a truth label (the report's ``truth``, a
  reviewed mask in ``labels``, or ``truth_mask.png`` in the disagreement's archive folder), the
  parts the truth calls defective that the live model rejected and the candidate passed: at
  most ``max_new_escapes`` (0).

Installing is a file swap, the way a reload has always taken a new model: the live model, its
card and its variants (``<stem>.int8.onnx`` ...) are copied to
``<state_dir>/models/<sha256[:12]>/`` (kept for a rollback), the candidate's replace them in
place (each written to a temporary file and renamed; live variants it lacks removed), and the
daemon named by ``<state_dir>/defectd.pid`` gets SIGHUP. ``promote`` then waits for the
daemon's own audit entry of the reload; when none comes in time (the reload failed, or no
daemon answered) the old files are put back and that is recorded too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from defectd.daemon.audit import AuditLog, ModelState
from defectd.errors import ConfigError, DataError, DefectdError
from defectd.model.card import file_sha256, load_card

PID_FILE = "defectd.pid"  # written by the daemon in its state directory
RETIRED_DIR = "models"  # <state_dir>/models/<sha256[:12]>/: models promotion replaced


class PromotionRefusedError(DefectdError):
    """A gate did not hold; the message names every failed gate."""


class PromotionConfig(BaseModel):
    """``[promotion]``: the gates a shadow-tested candidate must pass to become live."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_agreement: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.99, description="verdict agreement of live and candidate over compared parts"
    )
    min_parts: Annotated[int, Field(ge=1)] = Field(
        default=1000, description="parts the shadow report must have compared"
    )
    max_new_escapes: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="labelled disagreements the truth calls defective, the live model rejected "
        "and the candidate passed",
    )
    reload_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=120.0, description="how long promote waits for the daemon to confirm the reload"
    )


@dataclass(frozen=True, slots=True)
class Gate:
    """One gate: its name, whether it holds, the measured value and the limit, in words."""

    name: str
    ok: bool
    value: Any
    limit: Any
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "gate": self.name,
            "ok": self.ok,
            "value": self.value,
            "limit": self.limit,
            "detail": self.detail,
        }

    def line(self) -> str:
        return f"{self.name}: {self.detail}"


@dataclass
class GateResult:
    gates: list[Gate] = field(default_factory=list)
    escapes: list[dict[str, Any]] = field(default_factory=list)  # the new escapes found
    labelled: int = 0  # disagreements with a truth label
    unlabelled: int = 0

    @property
    def ok(self) -> bool:
        return all(g.ok for g in self.gates)

    @property
    def failed(self) -> list[str]:
        return [g.name for g in self.gates if not g.ok]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "gates": [g.as_dict() for g in self.gates],
            "labelled_disagreements": self.labelled,
            "unlabelled_disagreements": self.unlabelled,
            "new_escapes": self.escapes,
        }


def read_report(path: Path) -> dict[str, Any]:
    """A shadow report file (``defectd shadow report --json``); ``DataError`` naming it when it
    is not one."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: shadow report not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable shadow report: {exc}") from None
    need = ("live", "candidate", "parts", "agreement", "disagreements")
    if not isinstance(doc, dict) or any(k not in doc for k in need):
        raise DataError(
            f"{path}: not a shadow report (expected the keys {', '.join(need)}; "
            "write it with defectd shadow report --json)"
        )
    return doc


def _mask_truth(path: Path) -> str | None:
    """``fail`` when the mask file marks any defect pixel, ``pass`` when none, None when it
    cannot be read."""
    import cv2  # noqa: PLC0415  (the station has it; kept out of config parsing)

    data = np.fromfile(path, np.uint8) if path.is_file() else None
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data is not None and data.size else None
    if img is None:
        return None
    top = int(img.max())
    return "fail" if top > 0 and bool((img > (0 if top <= 1 else top // 2)).any()) else "pass"


def truth_of(disagreement: dict[str, Any], labels: Path | None) -> tuple[str | None, str]:
    """The truth of one disagreement (``pass``/``fail``/None) and where it came from: a
    reviewed mask in ``labels`` (named by the archive folder's name or the part id, ``.png``),
    the report's ``truth``, or ``truth_mask.png`` in its archive folder."""
    archive = disagreement.get("archive")
    names = [Path(str(archive)).name] if archive else []
    if disagreement.get("part_id"):
        names.append(str(disagreement["part_id"]))
    if labels is not None:
        for name in names:
            for candidate in (labels / f"{name}.png", labels / f"{name}_mask.png"):
                verdict = _mask_truth(candidate)
                if verdict is not None:
                    return verdict, f"reviewed:{candidate.name}"
    truth = disagreement.get("truth")
    if truth in ("pass", "fail"):
        return str(truth), "report"
    if archive:
        verdict = _mask_truth(Path(str(archive)) / "truth_mask.png")
        if verdict is not None:
            return verdict, "archive"
    return None, ""


def evaluate_gates(
    report: dict[str, Any],
    gates: PromotionConfig,
    *,
    candidate_sha256s: set[str],
    live_sha256s: set[str],
    labels: Path | None = None,
) -> GateResult:
    """Check every gate (module docstring) on a shadow report; never raises for a failed gate."""
    result = GateResult()
    live = report.get("live") or {}
    cand = report.get("candidate") or {}
    same = cand.get("sha256") in candidate_sha256s and live.get("sha256") in live_sha256s
    result.gates.append(
        Gate(
            "same_models",
            same,
            {"live": live.get("sha256"), "candidate": cand.get("sha256")},
            {"live": sorted(live_sha256s), "candidate": sorted(candidate_sha256s)},
            "the report compares this candidate with the live model"
            if same
            else "the report is about other models (live "
            f"{str(live.get('sha256'))[:12]}, candidate {str(cand.get('sha256'))[:12]}; "
            f"configured live {', '.join(s[:12] for s in sorted(live_sha256s))}, "
            f"candidate files {', '.join(s[:12] for s in sorted(candidate_sha256s))})",
        )
    )
    parts = int(report.get("parts") or 0)
    result.gates.append(
        Gate(
            "min_parts",
            parts >= gates.min_parts,
            parts,
            gates.min_parts,
            f"{parts} parts compared, {gates.min_parts} needed",
        )
    )
    agreement = report.get("agreement")
    ok = isinstance(agreement, int | float) and agreement >= gates.min_agreement
    shown = f"{agreement:.4f}" if isinstance(agreement, int | float) else "none"
    result.gates.append(
        Gate(
            "min_agreement",
            ok,
            agreement,
            gates.min_agreement,
            f"agreement {shown}, at least {gates.min_agreement:.4f} needed",
        )
    )
    for d in report.get("disagreements") or []:
        if not isinstance(d, dict):
            continue
        truth, source = truth_of(d, labels)
        if truth is None:
            result.unlabelled += 1
            continue
        result.labelled += 1
        if truth == "fail" and d.get("live") == "fail" and d.get("shadow") == "pass":
            result.escapes.append(
                {k: d.get(k) for k in ("seq", "part_id", "camera", "archive")}
                | {"truth_from": source}
            )
    n = len(result.escapes)
    where = ", ".join(f"{e.get('camera')}#{e.get('seq')}" for e in result.escapes[:5])
    result.gates.append(
        Gate(
            "no_new_escapes",
            n <= gates.max_new_escapes,
            n,
            gates.max_new_escapes,
            f"{n} new escape(s) among {result.labelled} labelled disagreements"
            + (f" ({where})" if where else "")
            + f", at most {gates.max_new_escapes} allowed"
            + (f"; {result.unlabelled} disagreements have no label" if result.unlabelled else ""),
        )
    )
    return result


_FAMILY = re.compile(r"\.(?:[A-Za-z0-9_-]+\.)?(?:onnx|card\.json)$")


def model_family(model: Path) -> list[Path]:
    """The model file and the files that go with it in its folder: its card and the variants
    an engine may pick instead (``<stem>.int8.onnx``, ``<stem>.int8-sym.onnx`` and their cards);
    the main model file last."""
    stem = model.stem
    found = [
        p
        for p in sorted(model.parent.iterdir())
        if p.is_file()
        and p != model
        and p.name.startswith(stem + ".")
        and _FAMILY.fullmatch(p.name[len(stem) :])
    ]
    return [*found, model]


def family_sha256s(model: Path) -> set[str]:
    """sha256 of every ONNX file of the model's family: what an engine may execute."""
    return {file_sha256(p) for p in model_family(model) if p.suffix == ".onnx"}


@dataclass(frozen=True, slots=True)
class Installed:
    """What ``install`` did: the live model, where the replaced family was kept, and the
    files the candidate brought (to undo)."""

    live: Path
    retired: Path
    kept: tuple[Path, ...]  # the replaced files, under ``retired``'s folder
    written: tuple[Path, ...]  # files now in the live folder that came from the candidate


def _copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.promote.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def install(candidate: Path, live: Path, state_dir: Path) -> Installed:
    """Keep the live model's family (model, card, int8 variants) under
    ``<state_dir>/models/<sha256[:12]>/`` and put the candidate's in its place under the live
    names, each file by rename, the main model last; live variants the candidate does not have
    are removed (an engine must not pick an old int8 file beside a new model). ``ConfigError``
    naming the file that cannot be written."""
    folder = state_dir / RETIRED_DIR / file_sha256(live)[:12]
    old = model_family(live)
    new = model_family(candidate)
    targets = [live.with_name(live.stem + p.name[len(candidate.stem) :]) for p in new]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        kept = []
        for p in old:
            shutil.copyfile(p, folder / p.name)
            kept.append(folder / p.name)
        for source, target in zip(new, targets, strict=True):
            _copy_atomic(source, target)
        for p in old:
            if p not in targets:
                p.unlink()
    except OSError as exc:
        raise ConfigError(f"model.path: cannot replace {live}: {exc}") from exc
    return Installed(live, folder / live.name, tuple(kept), tuple(targets))


def restore(installed: Installed) -> None:
    """Put the replaced family back (a reload that did not happen)."""
    names = {p.name for p in installed.kept}
    for p in installed.written:
        if p.name not in names:
            p.unlink(missing_ok=True)
    for p in sorted(installed.kept, key=lambda q: q.name == installed.live.name):
        _copy_atomic(p, installed.live.with_name(p.name))


def signal_daemon(state_dir: Path) -> int | None:
    """SIGHUP to the daemon of ``<state_dir>/defectd.pid``; its pid, or None when no daemon
    runs there. ``ConfigError`` when it runs but may not be signalled (another user)."""
    try:
        pid = int((state_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return None
    except PermissionError:
        raise ConfigError(
            f"{state_dir / PID_FILE}: daemon {pid} runs as another user; reload it with "
            "'sudo systemctl reload defectd'"
        ) from None
    return pid


def wait_for_reload(
    audit: AuditLog,
    station: str,
    after_seq: int,
    timeout_s: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any] | None:
    """The daemon's first ``reload`` or ``start`` entry after ``after_seq``, or None when none
    comes within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        for entry in audit.entries():
            if (
                entry.get("station") == station
                and isinstance(entry.get("seq"), int)
                and entry["seq"] > after_seq
                and entry.get("action") in ("reload", "start")
            ):
                return entry
        if time.monotonic() >= deadline:
            return None
        sleep(0.2)


def live_state(model: Path, audit: AuditLog, station: str) -> tuple[ModelState, set[str]]:
    """The live model as configured (name, file sha256, last audited config hash) and the
    sha256s that name it (the file's, and what the daemon last recorded as executed)."""
    card = load_card(model)
    sha = file_sha256(model)
    last = audit.last_state(station)
    names = family_sha256s(model)
    config_hash = ""
    if last is not None:
        config_hash = last.config_hash
        names.add(last.sha256)
    return ModelState(card.name, sha, config_hash), names


__all__ = [
    "Gate",
    "GateResult",
    "Installed",
    "PromotionConfig",
    "PromotionRefusedError",
    "evaluate_gates",
    "family_sha256s",
    "install",
    "live_state",
    "model_family",
    "read_report",
    "restore",
    "signal_daemon",
    "truth_of",
    "wait_for_reload",
]
