"""Torch views of a dataset split: fitted, augmented, normalised tensors, and a sampler that
shows the network defects often enough.

Images are decoded once and kept in RAM already fitted to the model input (card resize
policy), as uint8: the magnetic tile training split is ~60 MB at 256x256. Augmentation is a
few milliseconds per image, far below a training step on this CPU, so loading runs in the
training process (``num_workers=0``) and both cores stay with the network.

Randomness is a pure function of ``(seed, epoch, index)``, so a run is reproducible and a
resumed run continues with the same draws.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from defectd.data.datasets import BINARY_CLASSES, Dataset, Sample, unpack_labels
from defectd.model.card import Normalisation
from defectd.model.fit import FitPolicy, fit_to_input, to_chw
from defectd.training.augment import Augment


@dataclass(frozen=True)
class InputFit:
    """How images reach the network: ``channels`` x ``height`` x ``width`` by ``policy``."""

    channels: int
    height: int
    width: int
    policy: FitPolicy


class SegmentationSet(TorchDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item ``i``: ``(C, h, w)`` float32 normalised image and ``(K, h, w)`` float32 {0,1}
    masks, one per class of ``classes`` (``K = 1`` for the one class ``defect``: every defect
    pixel). Labels are kept as the dataset's ``(H, W)`` uint8 bit field
    (:meth:`Dataset.load_labels`) and unpacked per item.

    ``(h, w)`` is the fitted input size, or ``crop`` x ``crop`` when ``crop`` is set (training
    on crops of the fitted image; with probability ``defect_crop_p`` a crop of a defective image
    is placed so that it contains a random defect pixel).
    """

    def __init__(
        self,
        dataset: Dataset,
        samples: Sequence[Sample],
        fit: InputFit,
        normalisation: Normalisation,
        *,
        augment: Augment | None = None,
        crop: int | None = None,
        defect_crop_p: float = 0.7,
        seed: int = 0,
        classes: Sequence[str] = BINARY_CLASSES,
    ) -> None:
        self.samples = list(samples)
        self.classes = tuple(classes)
        self.fit = fit
        self.normalisation = normalisation
        self.augment = augment
        self.crop = crop
        self.defect_crop_p = defect_crop_p
        self.seed = seed
        self.epoch = 0
        images, masks = [], []
        for s in self.samples:
            img = dataset.load_image(s, fit.channels)
            msk = dataset.load_labels(s, img.shape[:2], self.classes)
            fimg, fmsk = fit_to_input(img, msk, fit.height, fit.width, fit.policy)
            assert fmsk is not None
            images.append(fimg)
            masks.append(fmsk)
        # (N, H, W[, 3]) uint8 and (N, H, W) uint8 {0,1}: one block each, no per-image objects.
        self.images: NDArray[np.uint8] = np.stack(images)
        self.masks: NDArray[np.uint8] = np.stack(masks)
        self.defective: NDArray[np.bool_] = np.asarray(
            self.masks.reshape(len(self.masks), -1).any(axis=1), dtype=bool
        )

    def __len__(self) -> int:
        return len(self.samples)

    def class_shares(self) -> list[float]:
        """Share of pixels of each class over the split (the output biases' prior)."""
        if len(self.classes) == 1:
            return [float(self.masks.mean())]
        return [float(((self.masks >> k) & 1).mean()) for k in range(len(self.classes))]

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of ``epoch`` (call before iterating each epoch)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        img, msk = self.images[index], self.masks[index]
        if self.augment is not None:
            img, msk = self.augment(img, msk, rng)
        if self.crop is not None:
            img, msk = self._crop(img, msk, rng)
        x = self.normalisation.apply(to_chw(img))
        y = unpack_labels(msk, len(self.classes))
        return torch.from_numpy(x), torch.from_numpy(y)

    def _crop(
        self, img: NDArray[np.uint8], msk: NDArray[np.uint8], rng: np.random.Generator
    ) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
        assert self.crop is not None
        c = self.crop
        h, w = msk.shape
        if c >= h and c >= w:
            return img, msk
        ch, cw = min(c, h), min(c, w)
        if msk.any() and rng.random() < self.defect_crop_p:
            ys, xs = np.nonzero(msk)
            k = int(rng.integers(ys.size))
            y0 = int(np.clip(ys[k] - rng.integers(0, ch), 0, h - ch))
            x0 = int(np.clip(xs[k] - rng.integers(0, cw), 0, w - cw))
        else:
            y0 = int(rng.integers(0, h - ch + 1))
            x0 = int(rng.integers(0, w - cw + 1))
        return (
            np.ascontiguousarray(img[y0 : y0 + ch, x0 : x0 + cw]),
            np.ascontiguousarray(msk[y0 : y0 + ch, x0 : x0 + cw]),
        )


HARD_RATIO_CAP = 8.0  # hard mining: an image's loss counts at most this many times its group's mean


class DefectBalancedSampler(Sampler[int]):
    """Draws ``num_samples`` indices per epoch with replacement so that a fraction
    ``defect_fraction`` of them (in expectation) are defective images.

    Sets where ~70% of the images are good would otherwise spend most steps on background.
    ``kinds`` (one label per image, e.g. the manifest's class) with it: every kind of defective
    image gets an equal share of the defective draws, so a kind with 20 images is drawn as
    often as one with 80. Deterministic for ``(seed, epoch)``; call :meth:`set_epoch` each epoch.

    ``hard_mining`` (0 to 1) draws images the network still gets wrong more often: the training
    loop hands back each drawn image's loss (:meth:`record`, in the order :attr:`drawn` lists the
    epoch's indices) and each epoch's weights scale by ``(1 - m) + m * r``, ``r`` the image's
    last loss over the mean of its group (defective or good; unseen images count as the mean,
    ``r`` at most :data:`HARD_RATIO_CAP`). The defective share and each kind's base weight stay
    as above, so a kind the network has not learned (faint stains among easy chips) gains draws
    from the easy images of its own group, never from the good parts. 0: the draws above.
    """

    def __init__(
        self,
        defective: NDArray[np.bool_],
        *,
        defect_fraction: float = 0.5,
        num_samples: int | None = None,
        seed: int = 0,
        kinds: Sequence[str] | None = None,
        hard_mining: float = 0.0,
    ) -> None:
        if not 0.0 <= hard_mining <= 1.0:
            raise ValueError(f"hard_mining {hard_mining}: expected a value within [0, 1]")
        n_bad = int(defective.sum())
        n_good = int(defective.size - n_bad)
        share = np.ones(defective.size)  # each defective image's weight within the defective
        if kinds is not None:
            if len(kinds) != defective.size:
                raise ValueError(f"{len(kinds)} kinds for {defective.size} images")
            labels = np.asarray(kinds, dtype=object)
            bad_kinds = sorted({str(k) for k in labels[defective]})
            for kind in bad_kinds:
                members = defective & (labels == kind)
                share[members] = n_bad / (len(bad_kinds) * int(members.sum()))
        if n_bad == 0 or n_good == 0:
            weights = np.where(defective, share, 1.0) / defective.size
        else:
            weights = np.where(
                defective, share * defect_fraction / n_bad, (1 - defect_fraction) / n_good
            )
        self.base: NDArray[np.float64] = np.asarray(weights / weights.sum(), dtype=np.float64)
        self.weights = self.base
        self.defective = np.asarray(defective, dtype=bool)
        self.hard_mining = hard_mining
        self.losses = np.full(defective.size, np.nan)  # last loss of each image, NaN: unseen
        self.drawn: list[int] = []  # this epoch's indices in the order they are yielded
        self.num_samples = num_samples if num_samples is not None else int(defective.size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def record(self, indices: Sequence[int], losses: Sequence[float]) -> None:
        """The loss each of ``indices`` had in the step that just trained on it."""
        self.losses[np.asarray(indices, dtype=np.int64)] = np.asarray(losses, dtype=np.float64)

    def _mined(self) -> NDArray[np.float64]:
        """The base weights scaled by each image's relative loss, group shares kept."""
        m = self.hard_mining
        if m == 0.0:
            return self.base
        out = self.base.copy()
        for group in (self.defective, ~self.defective):
            seen = group & np.isfinite(self.losses)
            if not seen.any():
                continue
            mean = float(self.losses[seen].mean())
            ratio = np.ones(int(group.sum()))
            if mean > 0.0:
                losses = self.losses[group]
                known = np.isfinite(losses)
                ratio[known] = np.minimum(losses[known] / mean, HARD_RATIO_CAP)
            scaled = self.base[group] * ((1.0 - m) + m * ratio)
            out[group] = scaled * (self.base[group].sum() / scaled.sum())
        return np.asarray(out / out.sum(), dtype=np.float64)

    def state_dict(self) -> dict[str, list[float]]:
        """What a resumed run needs to draw as the uninterrupted one would."""
        return {"losses": self.losses.tolist()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        losses = np.asarray(state["losses"], dtype=np.float64)
        if losses.shape != self.losses.shape:
            raise ValueError(f"{losses.size} recorded losses for {self.losses.size} images")
        self.losses = losses

    def shares(self, labels: Sequence[str]) -> dict[str, float]:
        """Expected share of the draws that fall on each label (one per image)."""
        out: dict[str, float] = {}
        for label, weight in zip(labels, self.weights, strict=True):
            out[label] = out.get(label, 0.0) + float(weight)
        return {k: round(v, 4) for k, v in sorted(out.items())}

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        self.weights = self._mined()
        rng = np.random.default_rng((self.seed, self.epoch, 0x5A3))
        picks = rng.choice(self.weights.size, size=self.num_samples, p=self.weights)
        self.drawn = [int(i) for i in picks]
        return iter(self.drawn)


def train_loader(
    data: SegmentationSet, sampler: DefectBalancedSampler, batch_size: int
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(B, C, h, w)`` float32 images and ``(B, K, h, w)`` float32 masks, in-process."""
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=0, drop_last=True)
