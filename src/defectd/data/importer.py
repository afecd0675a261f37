"""Bring labelled data from outside into the manifest layout that training and eval read.

Two sources, the forms labelling tools export:

* **folder pairs** — ``SRC/images/*`` and ``SRC/masks/*`` paired by file stem (a mask may also
  be named ``<stem>_mask.*``); mask pixels above half the file's range are defect, as
  :meth:`defectd.data.datasets.Dataset.load_mask` reads them.
* **COCO segmentation JSON** (CVAT, Label Studio, Roboflow, ... export it) — ``images``,
  ``annotations`` with ``segmentation`` as polygons or RLE (compressed or not), ``categories``.
  Every annotation of an image is painted into one binary mask (defect = any category); the
  image's ``cls`` is the category covering most pixels, ``free`` without annotations.

``import_dataset`` validates every pair and returns an :class:`ImportReport`: samples imported
per split and per class, and the problems found, each with the files concerned — missing masks,
image/mask size mismatch, empty masks (imported as defect-free), non-binary mask values (how
they are read), unreadable files, unknown image ids. Splits are assigned deterministically:
seeded and stratified by defective/good with exact proportions.

Output: with ``out`` the dataset is written there (images copied, masks written as 0/255 PNG);
folder pairs without ``out`` get only a ``manifest.csv`` beside their ``images/`` and
``masks/`` (nothing else is changed). An existing ``manifest.csv`` is replaced only with
``force``.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.data.datasets import IMAGE_SUFFIXES, MANIFEST_COLUMNS
from defectd.errors import ConfigError, DataError

MissingMask = Literal["skip", "good"]
GOOD_CLASS = "free"
DEFECT_CLASS = "defect"
SPLITS = ("train", "val", "test")


@dataclass
class ImportReport:
    """What an import did: counts, and the problems by kind (each a list of short lines)."""

    source: str
    kind: Literal["folders", "coco"]
    out: str
    manifest: str = ""
    imported: int = 0
    defective: int = 0
    splits: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> good/defective
    classes: dict[str, int] = field(default_factory=dict)
    missing_masks: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)
    empty_masks: list[str] = field(default_factory=list)
    non_binary: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return (
            len(self.size_mismatch)
            + len(self.unreadable)
            + (len(self.missing_masks) if self.missing_masks_skipped else 0)
        )

    missing_masks_skipped: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "out": self.out,
            "manifest": self.manifest,
            "imported": self.imported,
            "defective": self.defective,
            "skipped": self.skipped,
            "splits": self.splits,
            "classes": self.classes,
            "problems": {
                "missing_masks": self.missing_masks,
                "size_mismatch": self.size_mismatch,
                "empty_masks": self.empty_masks,
                "non_binary": self.non_binary,
                "unreadable": self.unreadable,
                "other": self.other,
            },
        }


@dataclass(frozen=True, slots=True)
class _Pair:
    stem: str
    image: Path
    mask: NDArray[np.uint8] | None  # (H, W) uint8 {0, 1}; None: defect-free without a mask
    mask_file: Path | None  # kept as is (folder pairs in place)
    cls: str
    size: tuple[int, int]  # (width, height)


def parse_splits(text: str) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> fractions of train/val/test; ``ConfigError`` when not 3 summing
    to 1."""
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1.0) > 1e-6:
        raise ConfigError(f"--splits: three non-negative fractions summing to 1, got {text!r}")
    return parts[0], parts[1], parts[2]


def _read_gray(path: Path) -> NDArray[Any] | None:
    data = np.fromfile(path, np.uint8) if path.is_file() else None
    if data is None or data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)


def _image_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` of an image file, or None when it cannot be decoded."""
    data = np.fromfile(path, np.uint8) if path.is_file() else None
    if data is None or data.size == 0:
        return None
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    return None if img is None else (int(img.shape[1]), int(img.shape[0]))


def read_mask_file(path: Path) -> NDArray[np.uint8]:
    """A mask file as ``(H, W)`` uint8 {0, 1}, read as the dataset reader reads it (defect
    where a pixel is above half the file's maximum); ``DataError`` naming an unreadable file."""
    raw = _read_gray(path)
    if raw is None:
        raise DataError(f"{path}: mask missing or not an image OpenCV can read")
    return _binary(raw)[0]


def _files(folder: Path) -> dict[str, Path]:
    return {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    }


def _binary(raw: NDArray[Any]) -> tuple[NDArray[np.uint8], list[int] | None]:
    """The mask as the dataset reader reads it, and the distinct values when not binary."""
    top = int(raw.max())
    cut = 0 if top <= 1 else top // 2
    values = np.unique(raw)
    odd = None if len(values) <= 2 and set(values.tolist()) <= {0, 1, 255, top} else values
    return (raw > cut).astype(np.uint8), (None if odd is None else [int(v) for v in odd[:8]])


def _folder_pairs(src: Path, report: ImportReport, missing: MissingMask) -> list[_Pair]:
    images_dir, masks_dir = src / "images", src / "masks"
    if not images_dir.is_dir():
        raise DataError(f"{src}: no images/ folder (expected images/ and masks/)")
    images = _files(images_dir)
    masks = _files(masks_dir) if masks_dir.is_dir() else {}
    if not images:
        raise DataError(f"{images_dir}: holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    pairs: list[_Pair] = []
    for stem, image in images.items():
        mask_file = masks.get(stem) or masks.get(f"{stem}_mask")
        size = _image_size(image)
        if size is None:
            report.unreadable.append(f"{image.name}: not an image OpenCV can read")
            continue
        if mask_file is None:
            report.missing_masks.append(image.name)
            if missing == "good":
                pairs.append(_Pair(stem, image, None, None, GOOD_CLASS, size))
            continue
        raw = _read_gray(mask_file)
        if raw is None:
            report.unreadable.append(f"{mask_file.name}: not an image OpenCV can read")
            continue
        if (raw.shape[1], raw.shape[0]) != size:
            report.size_mismatch.append(
                f"{mask_file.name}: mask {raw.shape[1]}x{raw.shape[0]}, image {size[0]}x{size[1]}"
            )
            continue
        mask, odd = _binary(raw)
        if odd is not None:
            cut = 0 if int(raw.max()) <= 1 else int(raw.max()) // 2
            report.non_binary.append(
                f"{mask_file.name}: values {odd}{'...' if len(odd) == 8 else ''}; "
                f"defect where > {cut}"
            )
        defective = bool(mask.any())
        if not defective:
            report.empty_masks.append(mask_file.name)
        cls = DEFECT_CLASS if defective else GOOD_CLASS
        pairs.append(_Pair(stem, image, mask, mask_file, cls, size))
    report.missing_masks_skipped = missing == "skip"
    return pairs


def coco_mask(segm: Any, height: int, width: int) -> NDArray[np.uint8]:
    """One annotation's ``segmentation`` (polygons, RLE or uncompressed RLE) as ``(H, W)``
    uint8 {0, 1}."""
    from pycocotools import mask as coco_mask  # noqa: PLC0415  (only imports need it)

    if isinstance(segm, list):  # polygons: [[x1, y1, x2, y2, ...], ...]
        polygons = [p for p in segm if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), np.uint8)
        rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = coco_mask.frPyObjects(segm, height, width)  # uncompressed RLE
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), str | bytes):
        counts = segm["counts"]
        rle = {
            "size": segm["size"],
            "counts": counts.encode() if isinstance(counts, str) else counts,
        }
    else:
        raise DataError("segmentation is neither polygons nor RLE")
    decoded = np.asarray(coco_mask.decode(rle), np.uint8)
    if decoded.ndim == 3:
        decoded = decoded.max(axis=2)
    return (decoded > 0).astype(np.uint8)


@dataclass(frozen=True, slots=True)
class CocoFile:
    """A COCO JSON file read for its masks: the ``images`` entries as written, category names
    by id, and the annotations (dicts) by image id."""

    images: list[Any]
    categories: dict[Any, str]
    by_image: dict[Any, list[dict[str, Any]]]

    def image_mask(
        self, image_id: Any, height: int, width: int
    ) -> tuple[NDArray[np.uint8], Counter[str], list[str]]:
        """The union ``(height, width)`` uint8 {0, 1} mask of an image's annotations, the pixels
        of each category (unnamed: ``defect``) and, for each annotation that cannot be drawn,
        ``"annotation ID: why"`` (it adds nothing to the mask)."""
        mask = np.zeros((height, width), np.uint8)
        area: Counter[str] = Counter()
        errors: list[str] = []
        for name, one in self._drawn(image_id, height, width, errors):
            mask |= one
            area[name] += int(one.sum())
        return mask, area, errors

    def image_index(
        self, image_id: Any, height: int, width: int
    ) -> tuple[NDArray[np.uint8], tuple[str, ...], list[str]]:
        """An image's annotations as a ``(height, width)`` uint8 class-index mask (value ``i``
        = the ``i``-th of the returned category names; where annotations overlap the later
        one wins), the names, and the annotations that cannot be drawn (as ``image_mask``)."""
        names = tuple(dict.fromkeys((*self.categories.values(), DEFECT_CLASS)))
        index = np.zeros((height, width), np.uint8)
        errors: list[str] = []
        for name, one in self._drawn(image_id, height, width, errors):
            index[one > 0] = names.index(name) + 1
        return index, names, errors

    def _drawn(
        self, image_id: Any, height: int, width: int, errors: list[str]
    ) -> Iterator[tuple[str, NDArray[np.uint8]]]:
        """``(category name, {0, 1} mask)`` per annotation of the image that can be drawn;
        the others are added to ``errors``."""
        for ann in self.by_image.get(image_id, []):
            try:
                one = coco_mask(ann.get("segmentation"), height, width)
            except (DataError, ValueError, TypeError, KeyError) as exc:
                errors.append(f"annotation {ann.get('id')}: {exc}")
                continue
            yield self.categories.get(ann.get("category_id"), DEFECT_CLASS), one


def read_coco(annotations: Path) -> CocoFile:
    """Read a COCO JSON file; ``DataError`` naming it when it cannot be read or has no
    ``images`` list."""
    try:
        doc = json.loads(annotations.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{annotations}: not a readable COCO JSON file: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{annotations}: not COCO: no 'images' list")
    categories = {
        c.get("id"): str(c.get("name", c.get("id")))
        for c in doc.get("categories", [])
        if isinstance(c, dict)
    }
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in doc.get("annotations", []):
        if isinstance(ann, dict):
            by_image.setdefault(ann.get("image_id"), []).append(ann)
    return CocoFile(doc["images"], categories, by_image)


def _coco_pairs(annotations: Path, images_dir: Path, report: ImportReport) -> list[_Pair]:
    coco = read_coco(annotations)
    known = {img.get("id") for img in coco.images if isinstance(img, dict)}
    for image_id in sorted(set(coco.by_image) - known, key=str):
        report.other.append(f"annotations for unknown image id {image_id!r}")
    pairs: list[_Pair] = []
    for entry in coco.images:
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            report.other.append(f"image entry without file_name: {str(entry)[:80]}")
            continue
        image = images_dir / entry["file_name"]
        size = _image_size(image)
        if size is None:
            report.unreadable.append(f"{entry['file_name']}: missing or not an image")
            continue
        width, height = size
        if (entry.get("width"), entry.get("height")) not in ((width, height), (None, None)):
            report.size_mismatch.append(
                f"{entry['file_name']}: JSON says {entry.get('width')}x{entry.get('height')}, "
                f"file is {width}x{height}"
            )
            continue
        mask, area, errors = coco.image_mask(entry.get("id"), height, width)
        if errors:
            report.other.extend(f"{entry['file_name']}: {e}" for e in errors)
            continue
        defective = bool(mask.any())
        if coco.by_image.get(entry.get("id")) and not defective:
            report.empty_masks.append(f"{entry['file_name']}: annotations cover no pixel")
        cls = area.most_common(1)[0][0] if defective else GOOD_CLASS
        stem = Path(entry["file_name"]).with_suffix("").as_posix().replace("/", "__")
        pairs.append(_Pair(stem, image, mask, None, cls, size))
    return pairs


def _assign_splits(
    pairs: Sequence[_Pair], fractions: tuple[float, float, float], seed: int
) -> dict[str, str]:
    """stem -> split: seeded, stratified by defective/good, exact proportions per stratum."""
    out: dict[str, str] = {}
    for defective in (True, False):
        stems = sorted(p.stem for p in pairs if (p.cls != GOOD_CLASS) == defective)
        random.Random(f"{seed}-{defective}").shuffle(stems)
        n = len(stems)
        n_train = round(n * fractions[0])
        n_val = min(n - n_train, round(n * fractions[1]))
        for i, stem in enumerate(stems):
            out[stem] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    return out


def _write_png(path: Path, image: NDArray[Any]) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise DataError(f"{path}: cannot encode PNG")
    path.write_bytes(buf.tobytes())


def import_dataset(
    source: Path,
    *,
    out: Path | None = None,
    images: Path | None = None,
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    missing_mask: MissingMask = "skip",
    force: bool = False,
) -> ImportReport:
    """Import ``source`` (a folder with ``images/`` + ``masks/``, or a COCO ``.json``); see the
    module. ``images`` is the COCO images folder (default: beside the JSON, else its
    ``images/``). Raises ``DataError`` for an unusable source or when nothing could be imported,
    ``ConfigError`` for conflicting options (an existing manifest without ``force``)."""
    source = Path(source)
    is_coco = source.suffix.lower() == ".json"
    if not source.exists():
        raise DataError(f"{source}: not found")
    if is_coco:
        target = out if out is not None else source.parent
        images_dir = images or (
            source.parent / "images" if (source.parent / "images").is_dir() else source.parent
        )
        if out is None:
            raise ConfigError("--out: a COCO import writes a new dataset folder; name it")
    else:
        if not source.is_dir():
            raise DataError(f"{source}: neither a folder (images/ + masks/) nor a COCO .json")
        target = out if out is not None else source
        images_dir = source / "images"
    manifest = target / "manifest.csv"
    if manifest.exists() and not force:
        raise ConfigError(f"{manifest} exists; pass --force to replace it")
    if out is not None and out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out: {out} is not empty; choose a new folder or pass --force")
    report = ImportReport(
        source=str(source), kind="coco" if is_coco else "folders", out=str(target)
    )
    pairs = (
        _coco_pairs(source, images_dir, report)
        if is_coco
        else _folder_pairs(source, report, missing_mask)
    )
    if not pairs:
        raise DataError(f"{source}: nothing to import ({_summary(report)})")
    seen: set[str] = set()
    unique: list[_Pair] = []
    for p in pairs:
        if p.stem in seen:
            report.other.append(f"{p.image.name}: stem {p.stem!r} used twice; kept the first")
            continue
        seen.add(p.stem)
        unique.append(p)
    split_of = _assign_splits(unique, splits, seed)

    copy_files = out is not None
    if copy_files:
        (target / "images").mkdir(parents=True, exist_ok=True)
        (target / "masks").mkdir(parents=True, exist_ok=True)
    rows: list[list[Any]] = []
    for p in unique:
        if copy_files:
            image_rel = f"images/{p.stem}{p.image.suffix.lower()}"
            shutil.copyfile(p.image, target / image_rel)
            mask_rel = ""
            if p.mask is not None:
                mask_rel = f"masks/{p.stem}.png"
                _write_png(target / mask_rel, p.mask * np.uint8(255))
        else:
            image_rel = p.image.relative_to(target).as_posix()
            mask_rel = "" if p.mask_file is None else p.mask_file.relative_to(target).as_posix()
        defective = p.cls != GOOD_CLASS
        fraction = 0.0 if p.mask is None else float(p.mask.mean())
        split = split_of[p.stem]
        rows.append(
            [
                p.stem,
                p.cls,
                image_rel,
                mask_rel,
                split,
                p.size[0],
                p.size[1],
                int(defective),
                f"{fraction:.6f}",
                p.stem,
            ]
        )
        counts = report.splits.setdefault(split, {"good": 0, "defective": 0})
        counts["defective" if defective else "good"] += 1
        report.classes[p.cls] = report.classes.get(p.cls, 0) + 1
        report.defective += int(defective)
    report.imported = len(rows)
    target.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_name("manifest.csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    tmp.replace(manifest)
    report.manifest = str(manifest)
    return report


def _summary(report: ImportReport) -> str:
    parts = [
        f"{len(v)} {k.replace('_', ' ')}"
        for k, v in (
            ("missing_masks", report.missing_masks),
            ("size_mismatch", report.size_mismatch),
            ("unreadable", report.unreadable),
            ("other", report.other),
        )
        if v
    ]
    return ", ".join(parts) or "no images"


__all__ = ["ImportReport", "coco_mask", "import_dataset", "parse_splits", "read_mask_file"]
