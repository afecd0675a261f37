"""The image archive: fail and error parts, plus a sample of passes, kept for review and retraining.

Written by one named thread off the hot path (a bounded queue; when it is full the part is
skipped and counted, never waited for). The archive is a dataset in the manifest layout that
``defectd.data.datasets.open_dataset`` reads, so ``defectd train`` and ``defectd eval`` take
it as is::

    ARCHIVE/images/<stem>.png      the frame as grabbed (gray, or RGB stored as PNG)
    ARCHIVE/masks/<stem>.png       0 = good, 255 = defect
    ARCHIVE/overlays/<stem>.png    the frame with defects outlined, for a human
    ARCHIVE/results/<stem>.json    the inspection result (as published) + where the mask came from
    ARCHIVE/manifest.csv           stem,cls,image,mask,split,width,height,has_defect,...

With a multi-class model the archive also keeps each part's class-index mask, in NEU-Seg's
layout as ``defectd synth --classes`` writes it::

    ARCHIVE/masks_cls/<stem>.png   0 = good, value i = line i of classes.txt
    ARCHIVE/classes.txt            the classes, in the order their values were given
    ARCHIVE/manifest.csv           ... plus mask_classes; cls names the classes present (a+b)

Values never change meaning: ``classes.txt`` starts with the model's classes and only grows
(a later model with other classes, or a truth naming a class the model lacks, appends it), so
one archive stays one data set across model changes. The truth of a synthetic line carries its
classes (``truth_labels``, ``truth_classes``); a model's prediction has the card's. Binary
models' archives are as they always were (no class files, no extra column).

Masks are ground truth when the source carries it (synthetic line, replay of a labelled set),
otherwise the model's own prediction (``label_source`` in the result JSON): review them before
retraining on them. Parts whose verdict is ``error`` were not inspected: they have no label, so
they get an empty mask column, ``cls = "error"`` and the split ``review`` (never ``train``,
``val`` or ``test``) until someone labels them. Stems start with the grab time (UTC), so they
sort by age; when the files exceed the disk quota the oldest parts are removed first.

Over 600 lines because the writer thread, the manifest it keeps in step with the files, the
quota pruning and the reload of an archive left by an earlier run share one lock and one file
layout, and read best next to each other.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import cv2
import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from defectd.data.datasets import (
    CLASS_INDEX_COLUMN,
    CLASS_INDEX_DIR,
    LABELLED_COLUMNS,
    MANIFEST_COLUMNS,
    index_cls,
    read_classes,
    remap_index,
    write_classes,
)
from defectd.data.palette import class_bgr
from defectd.errors import ConfigError
from defectd.log import get_logger
from defectd.pipeline.inspection import Inspection, Verdict

log = get_logger(__name__)

_SUBDIRS = ("images", "masks", "overlays", "results")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# After pruning, the archive holds at most this fraction of its quota, so that pruning (which
# rewrites the manifest) happens once per few hundred parts rather than on every part.
_PRUNE_TO = 0.9


class ArchiveConfig(BaseModel):
    """``[archive]``: which parts to keep, where, and how much disk they may take."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    dir: Path = Field(
        default=Path("archive"), description="relative paths are under the state directory"
    )
    fails: bool = Field(default=True, description="keep every fail part")
    errors: bool = Field(default=True, description="keep every part that got an error verdict")
    pass_sample: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.01, description="fraction of passes kept (chosen by result id, reproducible)"
    )
    quota_mb: Annotated[float, Field(gt=0)] = Field(
        default=2048.0, description="disk quota for all archive files; oldest parts go first"
    )
    queue_size: Annotated[int, Field(ge=1, le=10_000)] = 64
    overlays: bool = True
    splits: tuple[float, float, float] = Field(
        default=(0.7, 0.15, 0.15), description="train/val/test fractions for the manifest"
    )

    @model_validator(mode="after")
    def _splits_sum_to_one(self) -> ArchiveConfig:
        if any(s < 0 for s in self.splits) or abs(sum(self.splits) - 1.0) > 1e-6:
            raise ValueError("splits must be three non-negative fractions that sum to 1")
        return self


@dataclass(frozen=True, slots=True)
class ArchiveStats:
    queued: int
    written: int
    skipped_queue_full: int
    dropped_at_stop: int
    pruned: int
    failed: int
    parts: int
    bytes: int
    quota_bytes: int


@dataclass(frozen=True, slots=True)
class _Item:
    inspection: Inspection
    image: NDArray[Any]
    mask: NDArray[np.uint8] | None
    label_source: str
    kinds: tuple[str, ...]
    # A multi-class part's class-index mask (value i = index_names[i - 1]); None: binary only.
    index: NDArray[np.uint8] | None = None
    index_names: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()  # the card's classes of the model that inspected the part


@dataclass(slots=True)
class _Entry:
    stem: str
    size: int


def part_stem(inspection: Inspection) -> str:
    """``20250101T120000.123Z-cam0-00000042-ab12cd34``: sorts by grab time, unique per result."""
    when = datetime.fromtimestamp(inspection.t_grab_wall or time.time(), UTC)
    stamp = when.strftime("%Y%m%dT%H%M%S") + f".{when.microsecond // 1000:03d}Z"
    camera = _UNSAFE.sub("_", inspection.camera) or "camera"
    return f"{stamp}-{camera}-{inspection.seq:08d}-{inspection.result_id[:8]}"


def split_for(stem: str, splits: tuple[float, float, float]) -> str:
    """Deterministic split from crc32 of the stem, so a part never moves between splits."""
    u = (zlib.crc32(stem.encode()) & 0xFFFFFFFF) / 2**32
    if u < splits[0]:
        return "train"
    if u < splits[0] + splits[1]:
        return "val"
    return "test"


def sampled(result_id: str, fraction: float) -> bool:
    """Whether a pass is kept: a pure function of its result id (uuid hex)."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    try:
        u = int(result_id[:8], 16) / 2**32
    except ValueError:
        u = (zlib.crc32(result_id.encode()) & 0xFFFFFFFF) / 2**32
    return u < fraction


def bbox_mask(
    inspection: Inspection, shape: tuple[int, int], classes: Sequence[str] = ("defect",)
) -> NDArray[np.uint8]:
    """A coarse ``(H, W)`` uint8 mask from the defects' boxes (when no pixel mask came):
    {0, 1} for one class, else the box of each defect set to its class index + 1."""
    mask = np.zeros(shape, np.uint8)
    for d in inspection.defects:
        x, y, w, h = d.bbox
        value = classes.index(d.cls) + 1 if len(classes) > 1 and d.cls in classes else 1
        mask[max(y, 0) : y + h, max(x, 0) : x + w] = value
    return mask


def render_overlay(
    image: NDArray[Any], mask: NDArray[np.uint8] | None, inspection: Inspection
) -> NDArray[np.uint8]:
    """The frame as ``(H, W, 3)`` uint8 BGR with defect pixels tinted red and boxes drawn."""
    img = image
    if img.dtype != np.uint8:  # Mono10/12/16: show the top 8 bits of the used range
        peak = max(int(img.max()), 1)
        img = (img.astype(np.float32) * (255.0 / peak)).astype(np.uint8)
    code = cv2.COLOR_GRAY2BGR if img.ndim == 2 else cv2.COLOR_RGB2BGR
    bgr = np.ascontiguousarray(cv2.cvtColor(img, code), dtype=np.uint8)
    box_colour = class_bgr(0)
    if mask is not None and mask.any():
        # A multi-class mask holds class index + 1 per pixel: one colour per class.
        for value in range(1, int(mask.max()) + 1):
            sel = mask == value
            if sel.any():
                tint = np.zeros_like(bgr)
                tint[...] = class_bgr(value - 1)
                bgr[sel] = cv2.addWeighted(bgr, 0.5, tint, 0.5, 0.0)[sel]
    for d in inspection.defects:
        x, y, w, h = d.bbox
        if mask is not None and mask.max() > 1:
            value = int(mask[max(y, 0) : y + h, max(x, 0) : x + w].max())
            box_colour = class_bgr(max(value, 1) - 1)
        cv2.rectangle(bgr, (x, y), (x + w - 1, y + h - 1), box_colour, 1)
    colour = {Verdict.PASS: (0, 200, 0), Verdict.FAIL: (0, 0, 255)}.get(
        inspection.verdict, (0, 165, 255)
    )
    label = f"{inspection.verdict.value} {inspection.camera}#{inspection.seq}"
    cv2.putText(bgr, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    return bgr


class Archive:
    """Keeps fail/error parts and sampled passes under ``config.dir`` within ``quota_mb``.

    ``submit`` is cheap and never blocks; ``start``/``stop`` own the writer thread
    (``archive-writer``). Raises ``ConfigError`` naming the folder when it cannot be created.
    """

    def __init__(self, config: ArchiveConfig, root: Path | None = None) -> None:
        self.config = config
        self.root = root if root is not None else config.dir
        self.quota_bytes = int(config.quota_mb * 1024 * 1024)
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=config.queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._entries: deque[_Entry] = deque()
        self._rows: dict[str, dict[str, str]] = {}
        self._bytes = 0
        self._queued = self._written = self._skipped = self._pruned = self._failed = 0
        self._dropped = 0
        # Set by ``stop`` when its time is nearly up: the writer finishes the part in hand and
        # drops the rest, so no thread is left writing while the interpreter shuts down.
        self._abandon = threading.Event()
        # Per-camera pass sampling while drift monitoring reports drift (replaced whole, so
        # readers in other threads see either the old or the new mapping).
        self._pass_sample: dict[str, float] = {}
        # Names of the class-index masks' values (classes.txt; only grows). Writer thread only.
        self._classes: list[str] = []
        self._labelled = False  # the manifest has the mask_classes column

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        try:
            for sub in _SUBDIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"archive.dir: cannot create {self.root}: {exc}") from exc
        self._load_existing()
        self._abandon.clear()
        self._thread = threading.Thread(target=self._run, name="archive-writer", daemon=True)
        self._thread.start()
        log.info(
            "archive_started",
            dir=str(self.root),
            parts=len(self._entries),
            used_mb=round(self._bytes / 2**20, 1),
            quota_mb=self.config.quota_mb,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued within ``timeout`` s, then stop the writer thread.

        The last part of ``timeout`` (up to 1 s) is kept for the part being written when time
        runs out: what is still queued then is dropped and counted (``archive_dropped_at_stop``),
        never left to a thread still encoding PNGs while the process exits. Verdicts do not
        depend on the archive (they are in the outbox), so only samples are lost.
        """
        if self._thread is None:
            return
        grace = min(1.0, timeout / 2)
        deadline = time.monotonic() + timeout
        writing_until = deadline - grace
        while True:
            try:
                self._queue.put(None, timeout=max(0.01, writing_until - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= writing_until:
                    break
        self._thread.join(max(0.0, writing_until - time.monotonic()))
        if self._thread.is_alive():
            self._abandon.set()
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("archive_stop_timeout", queued=self._queue.qsize())
        if self._dropped:
            log.warning("archive_dropped_at_stop", parts=self._dropped)
        self._thread = None

    # -- intake (any thread) ---------------------------------------------------------------

    def wants(self, inspection: Inspection) -> bool:
        """Whether this verdict is kept under the configured policy."""
        if not self.config.enabled:
            return False
        if inspection.verdict is Verdict.FAIL:
            return self.config.fails
        if inspection.verdict is Verdict.ERROR:
            return self.config.errors
        fraction = self._pass_sample.get(inspection.camera, self.config.pass_sample)
        return sampled(inspection.result_id, fraction)

    def set_pass_sample(self, camera: str, fraction: float | None) -> None:
        """Keep ``fraction`` of ``camera``'s passes from now on (drift monitoring raises it
        while the camera drifts, so the new condition is collected for retraining); ``None``
        returns to ``pass_sample``. Never lowers the configured rate."""
        table = dict(self._pass_sample)
        if fraction is None:
            table.pop(camera, None)
        else:
            table[camera] = max(fraction, self.config.pass_sample)
        self._pass_sample = table
        log.info(
            "archive_pass_sample",
            camera=camera,
            fraction=table.get(camera, self.config.pass_sample),
        )

    def reset_pass_sample(self) -> None:
        """Every camera back to ``pass_sample``."""
        self._pass_sample = {}

    def submit(
        self,
        inspection: Inspection,
        image: NDArray[Any],
        mask: NDArray[np.uint8] | None = None,
        *,
        truth: NDArray[np.uint8] | None = None,
        truth_kinds: Sequence[str] = (),
        classes: Sequence[str] = ("defect",),
        truth_labels: NDArray[np.uint8] | None = None,
        truth_classes: Sequence[str] = (),
    ) -> bool:
        """Queue a part for writing if the policy keeps it; returns whether it was queued.

        ``image`` is the frame as grabbed (``(H, W)`` or ``(H, W, 3)`` RGB, not modified
        afterwards by the caller); ``mask`` the predicted ``(H, W)`` uint8 mask of the model
        whose card has ``classes`` ({0, 1} for one class, else class index ``k + 1`` of
        ``classes[k]``); ``truth`` the true mask when the source knows it (preferred as the
        label), ``truth_kinds`` the defect kinds it holds (the manifest's ``cls``) and, for a
        multi-class model, ``truth_labels`` its class-index mask (value ``i`` =
        ``truth_classes[i - 1]``).
        """
        if not self.wants(inspection):
            return False
        names = tuple(classes)
        multiclass = len(names) > 1
        index: NDArray[np.uint8] | None = None
        if truth is not None:
            label, source = truth, "truth"
            if multiclass and truth_labels is not None and truth_classes:
                index, names = truth_labels, tuple(truth_classes)
        elif inspection.verdict is Verdict.ERROR:
            label, source = None, "none"
        elif mask is not None:
            label, source = mask, "prediction"
            index = mask if multiclass else None
        elif inspection.verdict is Verdict.PASS:
            label, source = None, "prediction"
        else:
            label, source = bbox_mask(inspection, image.shape[:2], names), "prediction-bbox"
            index = label if multiclass else None
        if index is None:
            names = ()
        item = _Item(
            inspection, image, label, source, tuple(truth_kinds), index, names, tuple(classes)
        )
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self._skipped += 1
            return False
        with self._lock:
            self._queued += 1
        return True

    def stats(self) -> ArchiveStats:
        with self._lock:
            return ArchiveStats(
                queued=self._queue.qsize(),
                written=self._written,
                skipped_queue_full=self._skipped,
                dropped_at_stop=self._dropped,
                pruned=self._pruned,
                failed=self._failed,
                parts=len(self._entries),
                bytes=self._bytes,
                quota_bytes=self.quota_bytes,
            )

    # -- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._abandon.is_set():
                self._drop_queued(1)
                return
            try:
                self._write(item)
            except Exception as exc:  # a full disk or a bad frame must not end the thread
                with self._lock:
                    self._failed += 1
                log.warning(
                    "archive_write_failed",
                    camera=item.inspection.camera,
                    seq=item.inspection.seq,
                    error=repr(exc),
                )

    def _drop_queued(self, in_hand: int) -> None:
        """Count ``in_hand`` and everything still queued as dropped (``stop`` ran out of time)."""
        dropped = in_hand
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            dropped += item is not None
        with self._lock:
            self._dropped += dropped

    def _write(self, item: _Item) -> None:
        ins = item.inspection
        stem = part_stem(ins)
        height, width = item.image.shape[:2]
        image = item.image
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        files: dict[str, bytes] = {"images": _png(image)}
        has_defect = item.mask is not None and bool(item.mask.any())
        fraction = float(item.mask.mean()) if item.mask is not None and has_defect else 0.0
        mask_rel = ""
        if item.mask is not None:
            files["masks"] = _png((item.mask > 0).astype(np.uint8) * 255)
            mask_rel = f"masks/{stem}.png"
        index = self._archive_index(item) if has_defect else None
        if index is not None:
            files[CLASS_INDEX_DIR] = _png(index)
        if self.config.overlays:
            files["overlays"] = _png(render_overlay(item.image, item.mask, ins))
        result = ins.to_dict() | {"label_source": item.label_source, "stem": stem}
        files["results"] = json.dumps(result, default=_json_default).encode()
        size = sum(len(b) for b in files.values())
        if size > self.quota_bytes:
            raise ValueError(f"one part ({size} bytes) exceeds the archive quota")
        for sub, data in files.items():
            ext = "json" if sub == "results" else "png"
            (self.root / sub / f"{stem}.{ext}").write_bytes(data)
        kinds = item.kinds
        if ins.verdict is Verdict.ERROR and item.mask is None:
            cls = "error"
        elif not has_defect:
            cls = "free"
        elif index is not None:
            cls = index_cls(index, self._classes) or (kinds[0] if kinds else "defect")
        else:
            cls = kinds[0] if kinds else "defect"
        row = {
            "stem": stem,
            "cls": cls,
            "image": f"images/{stem}.png",
            "mask": mask_rel,
            "split": "review" if cls == "error" else split_for(stem, self.config.splits),
            "width": str(width),
            "height": str(height),
            "has_defect": "1" if has_defect else "0",
            "defect_fraction": f"{fraction:.6f}",
            "group": stem,
        }
        if index is not None:
            row[CLASS_INDEX_COLUMN] = f"{CLASS_INDEX_DIR}/{stem}.png"
        self._append_row(row)
        with self._lock:
            self._entries.append(_Entry(stem, size))
            self._rows[stem] = row
            self._bytes += size
            self._written += 1
        if self._bytes > self.quota_bytes:
            self._prune()

    def _archive_index(self, item: _Item) -> NDArray[np.uint8] | None:
        """The defective part's class-index mask in the archive's values (``classes.txt``,
        grown by the names it lacks); None for a part without class labels."""
        if item.index is None:
            return None
        # The model's classes first, then any other class this part holds (a truth's kind the
        # model lacks); a class the part does not hold adds nothing.
        known = len(self._classes)
        self._classes.extend(c for c in dict.fromkeys(item.classes) if c not in self._classes)
        index = remap_index(item.index, item.index_names, self._classes)
        if len(self._classes) > known:
            write_classes(self.root, self._classes)
        (self.root / CLASS_INDEX_DIR).mkdir(exist_ok=True)
        if not self._labelled:
            # The first class-labelled part: the manifest gains the mask_classes column.
            self._labelled = True
            with self._lock:
                rows = list(self._rows.values())
            self._rewrite_manifest(rows)
        return index

    @property
    def _columns(self) -> tuple[str, ...]:
        return LABELLED_COLUMNS if self._labelled else MANIFEST_COLUMNS

    def _append_row(self, row: dict[str, str]) -> None:
        path = self.root / "manifest.csv"
        new = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._columns)
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _prune(self) -> None:
        removed = 0
        with self._lock:
            target = int(self.quota_bytes * _PRUNE_TO)
            victims: list[str] = []
            while self._entries and self._bytes > target:
                entry = self._entries.popleft()
                self._bytes -= entry.size
                self._rows.pop(entry.stem, None)
                victims.append(entry.stem)
            rows = list(self._rows.values())
            self._pruned += len(victims)
        self._rewrite_manifest(rows)
        for stem in victims:
            removed += self._remove_files(stem)
        log.info("archive_pruned", parts=len(victims), files=removed, used_bytes=self._bytes)

    def _rewrite_manifest(self, rows: list[dict[str, str]]) -> None:
        path = self.root / "manifest.csv"
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)

    def _remove_files(self, stem: str) -> int:
        removed = 0
        for sub in (*_SUBDIRS, CLASS_INDEX_DIR):
            for path in (self.root / sub).glob(f"{stem}.*"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _load_existing(self) -> None:
        """Rebuild the age order and sizes from the manifest; remove files it does not list
        (a part whose manifest row was never written, e.g. after a power cut)."""
        path = self.root / "manifest.csv"
        rows: list[dict[str, str]] = []
        if path.exists():
            with path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                rows = [dict(r) for r in reader]
                self._labelled = CLASS_INDEX_COLUMN in (reader.fieldnames or ())
        self._classes = list(read_classes(self.root))
        known = {r["stem"] for r in rows}
        orphans = 0
        present = [s for s in (*_SUBDIRS, CLASS_INDEX_DIR) if (self.root / s).is_dir()]
        for sub in present:
            for file in (self.root / sub).iterdir():
                if file.stem not in known:
                    file.unlink(missing_ok=True)
                    orphans += 1
        for row in sorted(rows, key=lambda r: r["stem"]):
            size = sum(
                p.stat().st_size
                for sub in present
                for p in (self.root / sub).glob(f"{row['stem']}.*")
            )
            self._entries.append(_Entry(row["stem"], size))
            self._rows[row["stem"]] = row
            self._bytes += size
        if orphans:
            log.info("archive_orphans_removed", files=orphans)
        if self._bytes > self.quota_bytes:
            self._prune()


def _png(image: NDArray[Any]) -> bytes:
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError(f"PNG encoding failed for an image of shape {image.shape}")
    return bytes(buf)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
