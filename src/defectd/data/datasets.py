"""Datasets on disk: the manifest layout and the MVTec AD layout, read the same way.

Layouts (detected by :func:`open_dataset`):

* **manifest** — ``manifest.csv`` beside ``images/`` and ``masks/``, as written by
  ``defectd synth``, the daemon's image archive and the shipped sets (magnetic tile, NEU-Seg).
  Columns: ``stem`` and ``image`` are required; ``cls`` (default ``defect`` / ``free``),
  ``mask`` (empty for no mask file), ``split`` (default ``train``), ``has_defect`` (default: a
  mask file is named), ``group`` (default the stem), ``mask_classes`` are optional; other
  columns are ignored. Paths are relative to the dataset folder. A good sample may have a mask
  of zeros or none.
* **mvtec** — one MVTec AD category folder: ``train/good/*.png``,
  ``test/<kind or good>/*.png``, ``ground_truth/<kind>/<name>_mask.png``. ``train/good`` is
  split ``train``. Of ``test``, a deterministic ~20% becomes ``val``: the samples whose
  ``zlib.crc32(stem) % 100 < 20`` with ``stem = "<kind>_<name>"`` (e.g. ``crack_003``); the
  rest stays ``test``. Good samples have ``cls = "good"`` as in MVTec.

Images are read as ``(H, W)`` uint8 grey or ``(H, W, 3)`` uint8 RGB; masks as ``(H, W)``
uint8 {0, 1}.

**Classes of pixels** (multi-class models, :meth:`Dataset.load_labels`). A sample's defect
pixels get their class from, in this order: its class-index mask (``mask_classes`` column:
0 = good, value ``i`` = the ``i``-th name of :attr:`Dataset.label_classes`), or its ``cls``
(the whole binary mask is of that class). ``label_classes`` are the lines of ``classes.txt``
beside the manifest when there is one, else the sorted class names the ``cls`` column gives
the samples with an index mask (``cls`` may join several with ``+``, as NEU-Seg does); every
index mask is checked against its ``cls``, so a wrong order is an error, not a silent swap.
Labels are an ``(H, W)`` uint8 bit field, bit ``k`` set where class ``k`` of the model's
classes is present (at most 8 classes): one array that masks' nearest-neighbour resizes,
flips and warps keep intact.

How an image reaches the model input is the card's fit policy, defined once in
:mod:`defectd.model.fit`.
"""

from __future__ import annotations

import csv
import hashlib
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.errors import DataError
from defectd.log import get_logger

log = get_logger(__name__)

# Columns of ``manifest.csv`` in the manifest layout (written by synth and the archive).
MANIFEST_COLUMNS = (
    "stem",
    "cls",
    "image",
    "mask",
    "split",
    "width",
    "height",
    "has_defect",
    "defect_fraction",
    "group",
)

# A class-labelled set (multi-class models) adds the class-index mask column after ``mask``,
# with the files in ``masks_cls/`` and the names of the values 1, 2, ... in ``classes.txt``:
# NEU-Seg's layout, written the same way by synth, the daemon's archive and from-archive.
CLASS_INDEX_COLUMN = "mask_classes"
CLASS_INDEX_DIR = "masks_cls"
CLASSES_FILE = "classes.txt"
LABELLED_COLUMNS = (*MANIFEST_COLUMNS[:4], CLASS_INDEX_COLUMN, *MANIFEST_COLUMNS[4:])

Layout = Literal["manifest", "mvtec"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MVTEC_VAL_PERCENT = 20
MAX_CLASSES = 8  # labels are a uint8 bit field
BINARY_CLASSES = ("defect",)  # a one-channel model: every defect pixel, whatever its class
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f", ""}


@dataclass(frozen=True)
class Sample:
    """One image of a dataset; ``mask`` is ``None`` when no mask file is named."""

    stem: str
    cls: str
    image: Path
    mask: Path | None
    split: str
    has_defect: bool
    group: str
    mask_classes: Path | None = None  # class-index mask (0 = good, i = label_classes[i - 1])

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes ``cls`` names (``"a+b"`` -> ``("a", "b")``)."""
        return tuple(c for c in self.cls.split("+") if c)


class Dataset:
    """Samples of one dataset folder, with image/mask loading and a content fingerprint."""

    def __init__(self, root: Path, layout: Layout, samples: Sequence[Sample]) -> None:
        self.root = root
        self.layout: Layout = layout
        self._samples = tuple(samples)
        self.classes: tuple[str, ...] = tuple(
            sorted({s.cls for s in self._samples if s.has_defect})
        )
        self.splits: tuple[str, ...] = tuple(sorted({s.split for s in self._samples}))
        self.label_classes: tuple[str, ...] = _label_classes(root, self._samples)

    def __len__(self) -> int:
        return len(self._samples)

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r}, layout={self.layout!r}, samples={len(self)})"

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {"images": n, "defective": n}}`` for summaries and model cards."""
        out: dict[str, dict[str, int]] = {}
        for s in self._samples:
            c = out.setdefault(s.split, {"images": 0, "defective": 0})
            c["images"] += 1
            c["defective"] += int(s.has_defect)
        return out

    def samples(self, split: str | None = None) -> list[Sample]:
        """All samples (``split=None``), those of one split, or those of several joined by ``+``
        (``"train+val"``: a recipe refitted on every image it was tuned with), in a stable order.

        An unknown split, or one without samples, is a ``DataError`` listing the splits there are.
        """
        if split is None:
            return list(self._samples)
        names = (split,) if split in self.splits else tuple(split.split("+"))
        for name in names:
            if name not in self.splits:
                raise DataError(
                    f"{self.root}: split {name!r} has no samples; "
                    f"splits here: {', '.join(self.splits) or 'none'}"
                )
        return [s for s in self._samples if s.split in names]

    def shared(self, split: str, other: str) -> int:
        """How many samples of ``other`` are also samples of ``split`` (``"train+val"`` and
        ``"val"`` share every val sample; distinct splits share none)."""
        inside = {(s.split, s.stem) for s in self.samples(split)}
        return sum((s.split, s.stem) in inside for s in self.samples(other))

    def load_image(self, sample: Sample, channels: int) -> NDArray[np.uint8]:
        """``(H, W)`` uint8 for ``channels=1``, ``(H, W, 3)`` uint8 RGB for ``channels=3``.

        Colour files are converted to grey and grey files to RGB as needed; 16-bit files are
        scaled to 8 bits. A missing, unreadable or corrupt file is a ``DataError`` naming it.
        """
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        return read_image(sample.image, channels)

    def load_mask(self, sample: Sample, shape: tuple[int, int]) -> NDArray[np.uint8]:
        """``(H, W)`` uint8 {0, 1} for an image of ``shape`` ``(H, W)``.

        Mask pixels above half the file's range count as defect (0/255 and 0/1 files both work).
        A good sample without a mask file gives zeros. ``DataError`` naming the file for a
        defective sample without a mask, an unreadable mask, or a mask of another size.
        """
        if sample.mask is None or not sample.mask.is_file():
            if not sample.has_defect:
                return np.zeros(shape, np.uint8)
            if sample.mask is None:
                raise DataError(
                    f"{sample.image}: defective sample without a mask file in {self.root}"
                )
            raise DataError(f"{sample.mask}: mask file not found (defective sample {sample.stem})")
        raw = _decode(sample.mask, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
        if raw.shape[:2] != tuple(shape):
            raise DataError(
                f"{sample.mask}: mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image is "
                f"{shape[1]}x{shape[0]}"
            )
        top = int(raw.max())
        cut = 0 if top <= 1 else top // 2
        return (raw > cut).astype(np.uint8)

    def defect_classes(self) -> tuple[str, ...]:
        """The classes a multi-class model trained on this set has, one channel each: the
        index masks' classes when samples have them, else the ``cls`` of defective samples."""
        if self.label_classes:
            return self.label_classes
        return self.classes

    def load_labels(
        self, sample: Sample, shape: tuple[int, int], classes: Sequence[str]
    ) -> NDArray[np.uint8]:
        """``(H, W)`` uint8 bit field of the sample's defect pixels by class: bit ``k`` where
        ``classes[k]`` is (see the module docstring). For the one class ``defect`` this is
        :meth:`load_mask` ({0, 1}, every defect pixel). ``DataError`` naming the file for a
        mask that cannot be read or does not match, and for a class not in ``classes``."""
        classes = tuple(classes)
        if classes == BINARY_CLASSES:
            return self.load_mask(sample, shape)
        if len(classes) > MAX_CLASSES:
            raise DataError(f"{len(classes)} classes; at most {MAX_CLASSES} are supported")
        out = np.zeros(shape, np.uint8)
        if not sample.has_defect:
            return out
        if sample.mask_classes is not None:
            index = self._load_index(sample, shape)
            for value, name in enumerate(self.label_classes, start=1):
                if name in classes:
                    out[index == value] |= np.uint8(1 << classes.index(name))
            return out
        binary = self.load_mask(sample, shape)
        names = sample.class_names
        if len(names) != 1 or names[0] not in classes:
            raise DataError(
                f"{sample.mask or sample.image}: class {sample.cls!r} of sample {sample.stem} "
                f"is not one of the model's classes ({', '.join(classes)}) and the sample has "
                "no class-index mask (mask_classes column)"
            )
        out[binary > 0] = np.uint8(1 << classes.index(names[0]))
        return out

    def load_index(self, sample: Sample, shape: tuple[int, int]) -> NDArray[np.uint8] | None:
        """The sample's class-index mask, ``(H, W)`` uint8 (0 = good, value ``i`` =
        ``label_classes[i - 1]``), checked against its ``cls``; ``None`` without one.
        ``DataError`` naming the file as for :meth:`load_labels`."""
        if sample.mask_classes is None:
            return None
        return self._load_index(sample, shape)

    def _load_index(self, sample: Sample, shape: tuple[int, int]) -> NDArray[np.uint8]:
        assert sample.mask_classes is not None
        path = sample.mask_classes
        if not path.is_file():
            raise DataError(f"{path}: class-index mask not found (sample {sample.stem})")
        index = np.asarray(_decode(path, cv2.IMREAD_GRAYSCALE), np.uint8)
        if index.shape[:2] != tuple(shape):
            raise DataError(
                f"{path}: class-index mask is {index.shape[1]}x{index.shape[0]} (WxH) but its "
                f"image is {shape[1]}x{shape[0]}"
            )
        present = {int(v) for v in np.unique(index)} - {0}
        known = len(self.label_classes)
        if max(present, default=0) > known:
            raise DataError(
                f"{path}: class value {max(present)} but the set names {known} classes "
                f"({', '.join(self.label_classes)})"
            )
        found = {self.label_classes[v - 1] for v in present}
        if sample.class_names and found != set(sample.class_names):
            raise DataError(
                f"{path}: holds {', '.join(sorted(found)) or 'no class'} but the manifest says "
                f"{sample.cls!r} (value i is class i of: {', '.join(self.label_classes)}; "
                "list them in classes.txt if that order is wrong)"
            )
        return index

    def fingerprint(self, split: str | None = None) -> str:
        """Hex sha256 over the split's samples: stem, class, flag, relative paths and file bytes
        (image, mask, and class-index mask where there is one).

        Stable across machines and folder locations; any changed image, mask or label changes
        it. Reads every file once (about 1 s per GB).
        """
        digest = hashlib.sha256()
        for s in sorted(self.samples(split), key=lambda s: (s.split, s.stem)):
            digest.update(f"{s.stem}\0{s.cls}\0{int(s.has_defect)}\0{s.split}\0".encode())
            # The class-index mask only where there is one: hashes of binary sets stay as they were.
            extra = () if s.mask_classes is None else (s.mask_classes,)
            for path in (s.image, s.mask, *extra):
                if path is None or not path.is_file():
                    digest.update(b"-\0")
                    continue
                digest.update(_relative(path, self.root).encode() + b"\0")
                digest.update(path.read_bytes())
        return digest.hexdigest()


def _label_classes(root: Path, samples: Sequence[Sample]) -> tuple[str, ...]:
    """Names of the class-index masks' values 1, 2, ...: ``classes.txt`` (one per line) or the
    sorted class names of the samples that have an index mask; ``()`` when none has one."""
    listed = read_classes(root)
    if listed:
        return listed
    return tuple(sorted({n for s in samples if s.mask_classes is not None for n in s.class_names}))


def read_classes(root: Path) -> tuple[str, ...]:
    """The names in ``root/classes.txt`` (value ``i`` of a class-index mask is name ``i``);
    ``()`` when there is no such file."""
    listing = root / CLASSES_FILE
    if not listing.is_file():
        return ()
    names = (line.strip() for line in listing.read_text(encoding="utf-8").splitlines())
    return tuple(n for n in names if n)


def write_classes(root: Path, names: Sequence[str]) -> None:
    """Write ``root/classes.txt``, one name per line (atomically: readers never see half)."""
    listing = root / CLASSES_FILE
    tmp = listing.with_name(f"{CLASSES_FILE}.tmp")
    tmp.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    tmp.replace(listing)


def index_cls(index: NDArray[np.uint8], names: Sequence[str]) -> str:
    """The manifest ``cls`` of a class-index mask: the sorted names of the values it holds,
    joined by ``+`` (``"pit+scratch"``; NEU-Seg's convention); ``""`` when it holds none."""
    present = np.flatnonzero(np.bincount(index.ravel(), minlength=len(names) + 1)[1:])
    return "+".join(sorted(names[int(v)] for v in present))


def remap_index(
    index: NDArray[np.uint8], names: Sequence[str], into: list[str]
) -> NDArray[np.uint8]:
    """``index`` (value ``i`` = ``names[i - 1]``) in the values of ``into`` (value ``i`` =
    ``into[i - 1]``), as a new array. A class that ``index`` holds and ``into`` lacks is
    appended to ``into``, so values already given never change meaning; a value beyond
    ``names`` becomes 0."""
    held = np.flatnonzero(np.bincount(index.ravel(), minlength=256)[1:])
    lacking = (names[int(v)] for v in held if v < len(names) and names[int(v)] not in into)
    into.extend(dict.fromkeys(lacking))
    lut = np.zeros(256, np.uint8)
    for value, name in enumerate(names, start=1):
        if name in into:
            lut[value] = into.index(name) + 1
    return lut[index]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _decode(path: Path, flags: int) -> NDArray[Any]:
    """Decode an image file with OpenCV; ``DataError`` naming the file when it cannot be."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read image file ({exc.strerror or exc})") from exc
    img = cv2.imdecode(data, flags) if data.size else None
    if img is None:
        raise DataError(f"{path}: not a readable image (empty, corrupt or unknown format)")
    return np.asarray(img)


def _to_uint8(img: NDArray[Any]) -> NDArray[np.uint8]:
    if img.dtype == np.uint8:
        return np.asarray(img, np.uint8)
    if img.dtype == np.uint16:
        return np.asarray(img >> 8, np.uint8)
    return np.asarray(np.clip(img, 0, 255), np.uint8)


def read_image(path: Path, channels: int) -> NDArray[np.uint8]:
    """Read one image file as ``(H, W)`` grey (``channels=1``) or ``(H, W, 3)`` RGB uint8.

    ``DataError`` naming the file when it is missing, unreadable or corrupt.
    """
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    img = _to_uint8(_decode(path, cv2.IMREAD_UNCHANGED))
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if channels == 1:
        if img.ndim == 2:
            return img
        code = cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        return np.asarray(cv2.cvtColor(img, code), np.uint8)
    if img.ndim == 2:
        return np.asarray(cv2.cvtColor(img, cv2.COLOR_GRAY2RGB), np.uint8)
    code = cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return np.asarray(cv2.cvtColor(img, code), np.uint8)


# --------------------------------------------------------------------------------- layouts


def _flag(value: str, path: Path, line: int) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise DataError(f"{path}:{line}: has_defect must be 0 or 1, got {value!r}")


def _read_manifest(root: Path) -> list[Sample]:
    path = root / "manifest.csv"
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = set(reader.fieldnames or ())
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read manifest ({exc})") from exc
    missing = {"stem", "image"} - columns
    if missing:
        raise DataError(
            f"{path}: manifest lacks column(s) {', '.join(sorted(missing))} "
            "(expected stem,cls,image,mask,split,...,has_defect,...)"
        )
    samples: list[Sample] = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        stem = (row.get("stem") or "").strip()
        image = (row.get("image") or "").strip()
        if not stem or not image:
            raise DataError(f"{path}:{line}: empty stem or image")
        if stem in seen:
            raise DataError(f"{path}:{line}: stem {stem!r} appears twice")
        seen.add(stem)
        mask_txt = (row.get("mask") or "").strip()
        mask = root / mask_txt if mask_txt else None
        if "has_defect" in columns:
            has_defect = _flag(row.get("has_defect") or "", path, line)
        else:
            has_defect = mask is not None
        cls = (row.get("cls") or "").strip() or ("defect" if has_defect else "free")
        index_txt = (row.get("mask_classes") or "").strip()
        samples.append(
            Sample(
                stem=stem,
                cls=cls,
                image=root / image,
                mask=mask,
                split=(row.get("split") or "").strip() or "train",
                has_defect=has_defect,
                group=(row.get("group") or "").strip() or stem,
                mask_classes=root / index_txt if index_txt else None,
            )
        )
    if not samples:
        raise DataError(f"{path}: manifest lists no samples")
    return samples


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _read_mvtec(root: Path) -> list[Sample]:
    samples = [
        Sample(f"good_{p.stem}", "good", p, None, "train", False, f"train_good_{p.stem}")
        for p in _images_in(root / "train" / "good")
    ]
    for kind_dir in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        kind = kind_dir.name
        for p in _images_in(kind_dir):
            stem = f"{kind}_{p.stem}"
            bad = kind != "good"
            mask = root / "ground_truth" / kind / f"{p.stem}_mask.png" if bad else None
            in_val = zlib.crc32(stem.encode()) % 100 < MVTEC_VAL_PERCENT
            split = "val" if in_val else "test"
            samples.append(Sample(stem, kind, p, mask, split, bad, f"test_{stem}"))
    return samples


def open_dataset(root: Path) -> Dataset:
    """Open a dataset folder in the manifest or MVTec AD layout (see the module docstring).

    Checks that every image exists and that a folder of defective samples has masks: when no
    defective sample has its mask file the error names the first missing one. Anything else
    is a ``DataError`` naming the folder and what was expected.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    layout: Layout
    if (root / "manifest.csv").is_file():
        layout, samples = "manifest", _read_manifest(root)
    elif (root / "train" / "good").is_dir() and (root / "test").is_dir():
        layout, samples = "mvtec", _read_mvtec(root)
    else:
        hint = ""
        nested = [p.name for p in sorted(root.iterdir()) if (p / "train" / "good").is_dir()]
        if nested:
            hint = f"; this looks like MVTec AD: open one category, e.g. {root / nested[0]}"
        raise DataError(
            f"{root}: not a dataset folder: expected manifest.csv with images/ and masks/, "
            f"or MVTec AD train/good/, test/<kind>/, ground_truth/<kind>/{hint}"
        )
    if not samples:
        raise DataError(f"{root}: dataset holds no images")
    missing_images = [s.image for s in samples if not s.image.is_file()]
    if missing_images:
        raise DataError(
            f"{missing_images[0]}: image file not found "
            f"({len(missing_images)} of {len(samples)} images of {root} missing)"
        )
    defective = [s for s in samples if s.has_defect]
    lacking = [s for s in defective if s.mask is None or not s.mask.is_file()]
    if defective and len(lacking) == len(defective):
        first = lacking[0]
        named = first.mask if first.mask is not None else f"{first.image} (mask column empty)"
        raise DataError(
            f"{named}: mask not found; {root} is a data folder without masks "
            f"(none of its {len(defective)} defective samples has one)"
        )
    if lacking:
        log.warning(
            "dataset_masks_missing",
            root=str(root),
            missing=len(lacking),
            defective=len(defective),
            first=str(lacking[0].mask or lacking[0].image),
        )
    ds = Dataset(root, layout, samples)
    log.debug("dataset_opened", root=str(root), layout=layout, samples=len(ds), splits=ds.splits)
    return ds


def unpack_labels(labels: NDArray[np.uint8], classes: int) -> NDArray[np.float32]:
    """``(H, W)`` uint8 bit field -> ``(classes, H, W)`` float32 {0, 1}; one class: ``labels``
    as they are ({0, 1})."""
    if classes == 1:
        return labels[None].astype(np.float32)
    bits = np.arange(classes, dtype=np.uint8).reshape(-1, 1, 1)
    return ((labels[None] >> bits) & 1).astype(np.float32)


def class_counts(samples: Sequence[Sample]) -> dict[str, int]:
    """Samples per ``cls`` (for summaries)."""
    return dict(Counter(s.cls for s in samples))
