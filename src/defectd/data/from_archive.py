"""Archived parts -> a training set: the retraining loop's ``defectd dataset from-archive``.

The daemon's archive (``defectd.daemon.archive``) is already in the manifest layout, but its
masks are only ground truth when the source knew it (synthetic line, replay of a labelled
set); otherwise they are the model's own prediction (``label_source`` in
``results/<stem>.json``), and training on them would teach the model its own mistakes. So each
archived part gets its label from, in this order:

1. ``reviewed`` — a label made in a labelling tool and handed in with ``labels``:
   * a folder of mask PNGs named by the archive stem (``<stem>.png`` or ``<stem>_mask.png``,
     as ``images/<stem>.png`` was handed to the tool) or by the part id (``<part_id>.png``);
     pixels above half the file's range are defect; an all-zero mask says "reviewed: good";
   * or a COCO segmentation JSON (CVAT, Label Studio, Roboflow export it) whose ``file_name``
     is the archived image (``<stem>.png``, any folder): polygons/RLE painted into one mask,
     ``cls`` the category covering most pixels; an image listed without annotations is good;
2. ``truth`` — the archive's own mask when ``label_source`` is ``truth``;
3. ``verdict-pass`` — a part the model passed is taken as good (``trust_passes``; sampled
   passes are most of a line's good parts), its mask empty;
4. otherwise the part is **unlabelled** (a fail or error with only the model's prediction):
   left out and listed (``unlabelled="skip"``, the default), or kept in split ``review`` with
   ``cls = "unlabelled"`` (``unlabelled="review"``) so that no split training or evaluation
   reads takes it in until someone labels it.

The output is a new dataset folder in the manifest layout: the archived images and the chosen
masks (0/255 PNG), merged with an original dataset's samples (``merge``; files copied as they
are, split kept), with provenance columns after the standard ones: ``source``
(``archive``/``original``), ``source_dir``, ``part_id``, ``seq``, ``camera``, ``result_id``,
``verdict``, ``label_source``, ``model_sha256``. Archived parts keep the archive's split (a
crc32 of the stem, so a part never moves) unless ``archive_split`` names one split for all.

**Class labels.** When the archive holds class-index masks (a multi-class model's station,
``classes.txt`` and ``masks_cls/``), or the merged set does, the output is class-labelled in
the same layout: ``masks_cls/<stem>.png`` (0 = good, value ``i`` = line ``i`` of the output's
``classes.txt``, which starts with the archive's classes, so their values stay), the
``mask_classes`` column, and ``cls`` naming every class present (``a+b``). A true label keeps
the archive's class-index mask; a COCO review paints each annotation with its category (a
category the archive lacks is appended); the merged set's index masks are re-valued into the
output's classes. A reviewed mask folder is binary (0/255): those parts get ``cls =
"defect"`` and no class-index mask, so review a multi-class line in a COCO tool. A binary
archive merged with a binary set gives exactly the output it always did.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.data.datasets import (
    CLASS_INDEX_COLUMN,
    CLASS_INDEX_DIR,
    IMAGE_SUFFIXES,
    LABELLED_COLUMNS,
    MANIFEST_COLUMNS,
    Dataset,
    index_cls,
    open_dataset,
    read_classes,
    remap_index,
    write_classes,
)
from defectd.data.importer import read_coco, read_mask_file
from defectd.errors import ConfigError, DataError

PROVENANCE_COLUMNS = (
    "source",
    "source_dir",
    "part_id",
    "seq",
    "camera",
    "result_id",
    "verdict",
    "label_source",
    "model_sha256",
)
COLUMNS = (*MANIFEST_COLUMNS, *PROVENANCE_COLUMNS)
Unlabelled = Literal["skip", "review"]
ArchiveSplit = Literal["keep", "train", "val", "test"]
UNLABELLED_CLASS = "unlabelled"
REVIEW_SPLIT = "review"
GOOD_CLASS = "free"


@dataclass(frozen=True, slots=True)
class Label:
    """A reviewed label: ``(H, W)`` uint8 {0, 1} and the class it names (``free`` when empty);
    from COCO also the class-index mask (value ``i`` = ``names[i - 1]``)."""

    mask: NDArray[np.uint8]
    cls: str
    file: str
    index: NDArray[np.uint8] | None = None
    names: tuple[str, ...] = ()


@dataclass
class FromArchiveReport:
    """What ``dataset_from_archive`` did: counts per label source and split, and problems."""

    archive: str
    out: str
    manifest: str = ""
    archived: int = 0
    included: int = 0
    by_label: dict[str, int] = field(default_factory=dict)  # reviewed/truth/verdict-pass/...
    unlabelled: list[str] = field(default_factory=list)  # stems: verdict, why
    original: int = 0
    splits: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> good/defective
    unmatched_labels: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unlabelled_policy: str = "skip"
    classes: list[str] | None = None  # a class-labelled output's classes.txt

    def as_dict(self) -> dict[str, Any]:
        return {
            "archive": self.archive,
            "out": self.out,
            "manifest": self.manifest,
            "archived": self.archived,
            "included": self.included,
            "by_label": self.by_label,
            "unlabelled": {"policy": self.unlabelled_policy, "parts": self.unlabelled},
            "original": self.original,
            "splits": self.splits,
            "unmatched_labels": self.unmatched_labels,
            "problems": self.problems,
        } | ({} if self.classes is None else {"classes": self.classes})


@dataclass(frozen=True, slots=True)
class _Part:
    stem: str
    row: dict[str, str]
    result: dict[str, Any]

    @property
    def label_source(self) -> str:
        return str(self.result.get("label_source") or "prediction")

    @property
    def verdict(self) -> str:
        v = self.result.get("verdict")
        if isinstance(v, str):
            return v
        return "error" if self.row.get("cls") == "error" else ""

    @property
    def part_id(self) -> str:
        return str(self.result.get("part_id") or "")


def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return [dict(r) for r in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read manifest ({exc})") from exc


def _archived_parts(archive: Path, report: FromArchiveReport) -> list[_Part]:
    manifest = archive / "manifest.csv"
    if not manifest.is_file():
        raise DataError(
            f"{archive}: not a defectd archive (no manifest.csv; the daemon's [archive] dir "
            "holds images/, masks/, results/ and manifest.csv)"
        )
    parts: list[_Part] = []
    for row in _read_rows(manifest):
        stem = (row.get("stem") or "").strip()
        if not stem:
            report.problems.append(f"{manifest}: a row without stem (skipped)")
            continue
        result: dict[str, Any] = {}
        result_file = archive / "results" / f"{stem}.json"
        try:
            loaded = json.loads(result_file.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                result = loaded
        except (OSError, ValueError):
            report.problems.append(f"{stem}: no readable results/{stem}.json (verdict unknown)")
        parts.append(_Part(stem, row, result))
    return parts


def _folder_labels(
    folder: Path, keys: dict[str, str], report: FromArchiveReport
) -> dict[str, Label]:
    """stem -> Label from mask files named ``<stem>[_mask].*`` or ``<part_id>[_mask].*``."""
    labels: dict[str, Label] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        key = path.stem[: -len("_mask")] if path.stem.endswith("_mask") else path.stem
        stem = keys.get(key)
        if stem is None:
            report.unmatched_labels.append(path.name)
            continue
        try:
            mask = read_mask_file(path)
        except DataError as exc:
            report.problems.append(str(exc))
            continue
        cls = "defect" if mask.any() else GOOD_CLASS
        labels[stem] = Label(mask, cls, path.name)
    return labels


def _coco_labels(
    annotations: Path, keys: dict[str, str], report: FromArchiveReport
) -> dict[str, Label]:
    coco = read_coco(annotations)
    labels: dict[str, Label] = {}
    for entry in coco.images:
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            report.problems.append(f"{annotations}: image entry without file_name")
            continue
        name = Path(entry["file_name"]).stem
        stem = keys.get(name)
        height, width = entry.get("height"), entry.get("width")
        if stem is None:
            report.unmatched_labels.append(entry["file_name"])
            continue
        if not isinstance(height, int) or not isinstance(width, int):
            report.problems.append(f"{entry['file_name']}: COCO entry without width/height")
            continue
        mask, area, errors = coco.image_mask(entry.get("id"), height, width)
        report.problems.extend(f"{entry['file_name']}: {e}" for e in errors)
        cls = max(area, key=lambda k: area[k]) if mask.any() else GOOD_CLASS
        index, names, _ = coco.image_index(entry.get("id"), height, width)
        labels[stem] = Label(mask, cls, entry["file_name"], index, names)
    return labels


def read_labels(
    labels: Path, parts: Sequence[_Part], report: FromArchiveReport
) -> dict[str, Label]:
    """Reviewed labels by archive stem from a mask folder or a COCO JSON (module docstring)."""
    keys = {p.stem: p.stem for p in parts}
    counts: dict[str, int] = {}
    for p in parts:
        if p.part_id:
            counts[p.part_id] = counts.get(p.part_id, 0) + 1
    for p in parts:  # a part id names a label only when one archived part has it
        if p.part_id and counts[p.part_id] == 1:
            keys.setdefault(p.part_id, p.stem)
    if labels.is_dir():
        return _folder_labels(labels, keys, report)
    if labels.is_file() and labels.suffix.lower() == ".json":
        return _coco_labels(labels, keys, report)
    raise DataError(f"{labels}: --labels must be a folder of mask PNGs or a COCO .json file")


def _write_png(path: Path, image: NDArray[Any]) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise DataError(f"{path}: cannot encode PNG")
    path.write_bytes(buf.tobytes())


def _image_size(path: Path) -> tuple[int, int] | None:
    data = np.fromfile(path, np.uint8) if path.is_file() else None
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data is not None and data.size else None
    return None if img is None else (int(img.shape[1]), int(img.shape[0]))


def _count(report: FromArchiveReport, split: str, defective: bool) -> None:
    c = report.splits.setdefault(split, {"good": 0, "defective": 0})
    c["defective" if defective else "good"] += 1


def _read_index(path: Path) -> NDArray[np.uint8] | None:
    data = np.fromfile(path, np.uint8) if path.is_file() else None
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data is not None and data.size else None
    return None if img is None else np.asarray(img, np.uint8)


def _write_index(
    out: Path, stem: str, index: NDArray[np.uint8], names: Sequence[str], classes: list[str]
) -> tuple[str, str]:
    """Write ``index`` (value i = ``names[i - 1]``) re-valued into ``classes`` (grown where it
    lacks one) as ``masks_cls/<stem>.png``; its column value and the ``cls`` it gives.
    An index holding no class is not written (``("", "")``): its part keeps its ``cls``."""
    values = remap_index(index, names, classes)
    held = index_cls(values, classes)
    if not held:
        return "", ""
    rel = f"{CLASS_INDEX_DIR}/{stem}.png"
    _write_png(out / rel, values)
    return rel, held


def _archive_row(
    archive: Path,
    out: Path,
    part: _Part,
    label: Label | None,
    *,
    source: str,
    split: str,
    classes: list[str] | None = None,
) -> tuple[dict[str, str], bool] | str:
    """Copy one archived part into ``out``; its manifest row and whether it is defective,
    or why it cannot be used. ``classes``: the output's class names for a class-labelled
    output (grown by the classes a label adds), None for a binary one."""
    image = archive / (part.row.get("image") or f"images/{part.stem}.png")
    size = _image_size(image)
    if size is None:
        return f"{part.stem}: image {image} missing or unreadable"
    mask: NDArray[np.uint8] | None
    cls: str
    index: NDArray[np.uint8] | None = None
    names: tuple[str, ...] = ()
    if label is not None:
        mask, cls = label.mask, label.cls
        if (mask.shape[1], mask.shape[0]) != size:
            return (
                f"{part.stem}: label {label.file} is {mask.shape[1]}x{mask.shape[0]}, "
                f"the archived image {size[0]}x{size[1]}"
            )
        index, names = label.index, label.names
    elif source == "truth":
        mask_rel = part.row.get("mask") or ""
        mask_file = archive / mask_rel if mask_rel else None
        if mask_file is None or not mask_file.is_file():
            mask = np.zeros((size[1], size[0]), np.uint8)
        else:
            try:
                mask = read_mask_file(mask_file)
            except DataError as exc:
                return str(exc)
        cls = (part.row.get("cls") or "defect") if mask.any() else GOOD_CLASS
        index_rel = part.row.get(CLASS_INDEX_COLUMN) or ""
        if classes is not None and index_rel:
            index = _read_index(archive / index_rel)
            if index is None or index.shape != mask.shape:
                return f"{part.stem}: class-index mask {archive / index_rel} missing or unusable"
            names = read_classes(archive)
    elif source == "verdict-pass":
        mask, cls = None, GOOD_CLASS
    else:  # unlabelled, kept for review
        mask, cls = None, UNLABELLED_CLASS
    defective = mask is not None and bool(mask.any())
    image_rel = f"images/{part.stem}{image.suffix.lower()}"
    shutil.copyfile(image, out / image_rel)
    mask_rel = ""
    if mask is not None:
        mask_rel = f"masks/{part.stem}.png"
        _write_png(out / mask_rel, (mask > 0).astype(np.uint8) * np.uint8(255))
    index_rel = ""
    if classes is not None and index is not None and defective:
        index_rel, held = _write_index(out, part.stem, index, names, classes)
        cls = held or cls
    result = part.result
    row = {
        "stem": part.stem,
        "cls": cls if defective or cls == UNLABELLED_CLASS else GOOD_CLASS,
        "image": image_rel,
        "mask": mask_rel,
        "split": split,
        "width": str(size[0]),
        "height": str(size[1]),
        "has_defect": "1" if defective else "0",
        "defect_fraction": f"{float(mask.mean()) if defective and mask is not None else 0.0:.6f}",
        "group": part.row.get("group") or part.stem,
        **({CLASS_INDEX_COLUMN: index_rel} if classes is not None else {}),
        "source": "archive",
        "source_dir": str(archive),
        "part_id": part.part_id,
        "seq": str(result.get("seq", "")),
        "camera": str(result.get("camera", "")),
        "result_id": str(result.get("result_id", "")),
        "verdict": part.verdict,
        "label_source": source,
        "model_sha256": str(result.get("model_sha256", "")),
    }
    return row, defective


def _original_rows(
    ds: Dataset,
    out: Path,
    taken: set[str],
    report: FromArchiveReport,
    classes: list[str] | None = None,
) -> list[dict[str, str]]:
    """The original dataset's samples, files copied as they are (masks keep their values;
    class-index masks are re-valued into ``classes`` for a class-labelled output)."""
    merge = ds.root
    known: dict[str, dict[str, str]] = {}
    if ds.layout == "manifest":
        known = {r.get("stem", ""): r for r in _read_rows(merge / "manifest.csv")}
    rows: list[dict[str, str]] = []
    for s in ds.samples():
        if s.stem in taken:
            raise DataError(
                f"{merge}: sample {s.stem!r} has the stem of an archived part; rename one"
            )
        taken.add(s.stem)
        image_rel = f"images/{s.stem}{s.image.suffix.lower()}"
        shutil.copyfile(s.image, out / image_rel)
        mask_rel = ""
        if s.mask is not None and s.mask.is_file():
            mask_rel = f"masks/{s.stem}{s.mask.suffix.lower()}"
            shutil.copyfile(s.mask, out / mask_rel)
        labelled: dict[str, str] = {}
        if classes is not None:
            labelled[CLASS_INDEX_COLUMN] = ""
            index = None if s.mask_classes is None else _read_index(s.mask_classes)
            if s.mask_classes is not None and index is None:
                raise DataError(f"{s.mask_classes}: class-index mask missing or unreadable")
            if index is not None:
                labelled[CLASS_INDEX_COLUMN], _ = _write_index(
                    out, s.stem, index, ds.label_classes, classes
                )
        old = known.get(s.stem, {})
        rows.append(
            {
                "stem": s.stem,
                "cls": s.cls,
                "image": image_rel,
                "mask": mask_rel,
                "split": s.split,
                "width": old.get("width", ""),
                "height": old.get("height", ""),
                "has_defect": "1" if s.has_defect else "0",
                "defect_fraction": old.get("defect_fraction", ""),
                "group": s.group,
                **labelled,
                "source": "original",
                "source_dir": str(merge),
                "label_source": old.get("label_source", "") or "original",
            }
        )
        _count(report, s.split, s.has_defect)
    report.original = len(rows)
    return rows


def dataset_from_archive(
    archive: Path,
    *,
    out: Path,
    merge: Path | None = None,
    labels: Path | None = None,
    unlabelled: Unlabelled = "skip",
    trust_passes: bool = True,
    archive_split: ArchiveSplit = "keep",
    force: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> FromArchiveReport:
    """Write a training set from ``archive`` (merged with ``merge``) into ``out``; see the
    module docstring. ``on_progress(done, total)`` is called per archived part.

    ``ConfigError`` for a used ``out`` without ``force``; ``DataError`` naming the folder or
    file for an unusable archive, label source or original dataset, and when no archived part
    has a label (nothing to add).
    """
    archive, out = Path(archive), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out: {out} is not empty; choose a new folder or pass --force")
    report = FromArchiveReport(archive=str(archive), out=str(out), unlabelled_policy=unlabelled)
    parts = _archived_parts(archive, report)
    report.archived = len(parts)
    reviewed = read_labels(labels, parts, report) if labels is not None else {}
    original = open_dataset(merge) if merge is not None else None
    # A class-labelled output when either side has class labels; else exactly as before.
    archive_classes = read_classes(archive)
    classes: list[str] | None = None
    if archive_classes or (original is not None and original.label_classes):
        classes = list(archive_classes)
    if out.exists() and force:
        for sub in ("images", "masks", CLASS_INDEX_DIR):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "classes.txt").unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if classes is not None:
        (out / CLASS_INDEX_DIR).mkdir(exist_ok=True)

    rows: list[dict[str, str]] = []
    for done, part in enumerate(parts, start=1):
        label = reviewed.get(part.stem)
        if label is not None:
            source = "reviewed"
        elif part.label_source == "truth":
            source = "truth"
        elif part.verdict == "pass" and trust_passes:
            source = "verdict-pass"
        else:
            why = "no label" if part.verdict else "no label, verdict unknown"
            report.unlabelled.append(f"{part.stem}: {part.verdict or '?'}, {why}")
            source = "unlabelled"
        if source == "unlabelled" and unlabelled == "skip":
            if on_progress is not None:
                on_progress(done, len(parts))
            continue
        kept = part.row.get("split") or "train"
        if source == "unlabelled":
            split = REVIEW_SPLIT
        elif archive_split != "keep":
            split = archive_split
        else:
            split = kept if kept in ("train", "val", "test") else "train"
        made = _archive_row(archive, out, part, label, source=source, split=split, classes=classes)
        if isinstance(made, str):
            report.problems.append(made)
        else:
            row, defective = made
            rows.append(row)
            report.by_label[source] = report.by_label.get(source, 0) + 1
            _count(report, split, defective)
        if on_progress is not None:
            on_progress(done, len(parts))
    report.included = len(rows)
    if not any(r["label_source"] != "unlabelled" for r in rows):
        raise DataError(
            f"{archive}: no archived part has a label ({len(parts)} parts, "
            f"{len(report.unlabelled)} unlabelled): label them and pass --labels"
        )
    if original is not None:
        rows.extend(_original_rows(original, out, {r["stem"] for r in rows}, report, classes))
    columns: tuple[str, ...] = COLUMNS
    report.classes = classes
    if classes is not None:
        write_classes(out, classes)
        columns = (*LABELLED_COLUMNS, *PROVENANCE_COLUMNS)
    manifest = out / "manifest.csv"
    tmp = manifest.with_name("manifest.csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(manifest)
    report.manifest = str(manifest)
    return report


__all__ = [
    "COLUMNS",
    "PROVENANCE_COLUMNS",
    "FromArchiveReport",
    "Label",
    "dataset_from_archive",
    "read_labels",
]
