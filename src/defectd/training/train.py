"""Training a U-Net on a dataset folder: one readable loop.

``train(TrainConfig(...))`` writes into ``config.out``:

* ``best.pt`` — the checkpoint with the best validation Dice (``select_by``: or Dice + image
  AUROC, or simply the final epoch), its card completed at the end (threshold chosen on the
  validation split, validation metrics, data hash, command line);
* ``last.pt`` — weights, optimiser, step and RNG states after each epoch, for ``resume``;
* ``history.jsonl`` — one JSON object per epoch (loss, lr, validation metrics, seconds).

On this CPU the loop runs in bfloat16 autocast with channels-last tensors when the CPU has
bf16 instructions (AVX512-BF16 or AMX): measured 2-3.5x faster per step than float32 for
these U-Nets. Weights, optimiser state and the loss stay float32.

The learning rate warms up linearly, then follows a cosine to ``min_lr_ratio * lr``. With
``time_limit_min`` the schedule runs on whichever is further along, steps or wall time, so a
time-limited run still ends with a decayed learning rate (it is then no longer bit-for-bit
reproducible, since wall time decides when it stops).

Over 600 lines because the loop stays one function to read top to bottom (``train``: resume,
schedule, time limit, validation, checkpoints), and the card it completes (``finish_card``,
the operating points chosen on the validation split) stays with the run that measured them;
losses, augmentation, data loading and evaluation live in their own modules.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from defectd.data.datasets import BINARY_CLASSES, MAX_CLASSES, Dataset, open_dataset
from defectd.data.drift import dataset_reference
from defectd.data.metrics import ClassAccumulator, ImageScore, MetricsAccumulator, Report
from defectd.errors import ConfigError, DataError
from defectd.log import get_logger
from defectd.model.card import (
    ClassPoint,
    InitInfo,
    InputSpec,
    ModelCard,
    Normalisation,
    TrainingInfo,
    file_sha256,
)
from defectd.model.checkpoint import load_matching, read_checkpoint, save_checkpoint
from defectd.model.fit import to_chw
from defectd.model.recover import read_init, refit_norms
from defectd.model.unet import Norm, UNet, UNetConfig, widen_state
from defectd.training.augment import Augment, AugmentConfig
from defectd.training.averaging import WeightAverage
from defectd.training.evaluate import (
    Evaluation,
    Prediction,
    TorchPredictor,
    channels_last,
    evaluate,
    predict,
)
from defectd.training.losses import LossConfig, LossKind, SegLoss, per_image_loss
from defectd.training.torchdata import (
    DefectBalancedSampler,
    InputFit,
    SegmentationSet,
    train_loader,
)

log = get_logger(__name__)

AugmentPreset = Literal["default", "light", "flip", "off"]
SelectBy = Literal["dice", "dice+auroc", "last"]
REFIT_IMAGES = 160  # training images that re-measure the norms of a model read from its export


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; stored in the checkpoints."""

    data: Path
    out: Path
    epochs: int = 40
    height: int = 256
    width: int = 256
    channels: int = 1
    resize: Literal["resize", "pad"] = "resize"
    base: int = 16
    depth: int = 4
    norm: Norm = "batch"
    dropout: float = 0.0
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    loss: LossKind = "bce_dice"
    pos_weight: float = 1.0
    defect_fraction: float = 0.5  # share of defective images the sampler draws
    balance_classes: bool = False  # every defect kind (image class) an equal share of those
    hard_mining: float = 0.0  # 0-1: draw images by their last loss too (DefectBalancedSampler)
    steps_per_epoch: int | None = None  # default: one pass over the split's size
    crop: int | None = None  # train on crops of the fitted image (validation: whole images)
    # flip: mirror images only. The default preset's photometric and rotation ops slowed
    # learning more than they helped on CPU budgets (docs/training.md, "Small data").
    augment: AugmentPreset = "flip"
    bf16: bool | None = None  # None: when the CPU has bf16 instructions
    threads: int | None = None  # None: every core this process may use
    seed: int = 0
    train_split: str = "train"
    val_split: str = "val"
    val_every: int = 1
    select_by: SelectBy = "dice"
    # > 0: the final model is the mean of the weights after each epoch ending in this last
    # share of the run, batch-norm statistics recomputed (defectd.training.averaging).
    average_last: float = 0.0
    image_score: ImageScore = "max"
    time_limit_min: float | None = None
    name: str = ""
    command: str = ""
    init: Path | None = None  # fine-tune: start from this checkpoint's matching tensors
    # One output channel per class: ("defect",) is the one-class model (every defect pixel);
    # ("auto",) takes the data set's classes (Dataset.defect_classes), resolved by ``train``.
    classes: tuple[str, ...] = BINARY_CLASSES

    def unet(self) -> UNetConfig:
        return UNetConfig(
            in_channels=self.channels,
            out_channels=len(self.classes),
            base=self.base,
            depth=self.depth,
            norm=self.norm,
            dropout=self.dropout,
        )

    def check(self) -> None:
        """``ConfigError`` naming the option for values that cannot work."""
        stride = 2**self.depth
        for key, value in (("height", self.height), ("width", self.width)):
            if value <= 0 or value % stride:
                raise ConfigError(f"--{key} {value}: must be a positive multiple of {stride}")
        if self.crop is not None and (self.crop % stride or self.crop <= 0):
            raise ConfigError(f"--crop {self.crop}: must be a positive multiple of {stride}")
        if self.channels not in (1, 3):
            raise ConfigError(f"--channels {self.channels}: must be 1 or 3")
        positive = (("epochs", self.epochs), ("batch-size", self.batch_size), ("base", self.base))
        for key, value in positive:
            if value <= 0:
                raise ConfigError(f"--{key} {value}: must be positive")
        if not 0.0 < self.lr < 1.0:
            raise ConfigError(f"--lr {self.lr}: expected a value in (0, 1)")
        if not 0.0 <= self.defect_fraction <= 1.0:
            raise ConfigError(f"--defect-fraction {self.defect_fraction}: must be within [0, 1]")
        if not 0.0 <= self.hard_mining <= 1.0:
            raise ConfigError(f"--hard-mining {self.hard_mining}: must be within [0, 1]")
        if self.time_limit_min is not None and self.time_limit_min <= 0:
            raise ConfigError(f"--time-limit {self.time_limit_min}: must be positive minutes")
        if not 0.0 <= self.average_last < 1.0:
            raise ConfigError(
                f"--average-last {self.average_last}: expected a share of the run in [0, 1)"
            )
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"--classes {','.join(self.classes)}: expected distinct names")
        if len(self.classes) > MAX_CLASSES:
            raise ConfigError(f"--classes: {len(self.classes)} classes, at most {MAX_CLASSES}")

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["data"], values["out"] = Path(values["data"]), Path(values["out"])
        if values.get("init"):
            values["init"] = Path(values["init"])
        if "classes" in values:
            values["classes"] = tuple(values["classes"])
        return cls(**values)


AUGMENT_PRESETS: dict[AugmentPreset, AugmentConfig] = {
    "default": AugmentConfig(),
    # No quarter turns or rotations: for parts whose texture has a fixed direction.
    "light": AugmentConfig(rot90=0.0, rotate_p=0.0, scale_p=0.3, scale=(0.9, 1.15)),
    # Mirror images only: on short CPU budgets the photometric ops slowed learning most.
    "flip": replace(AugmentConfig.off(), hflip=0.5, vflip=0.5),
    "off": AugmentConfig.off(),
}


@dataclass
class EpochRecord:
    """One line of ``history.jsonl``."""

    epoch: int
    step: int
    lr: float
    loss: float
    seconds: float
    val: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepInfo:
    epoch: int
    step: int
    steps_in_epoch: int
    loss: float
    lr: float
    progress: float  # 0..1 of the whole run (steps or time, whichever is further)


@dataclass(frozen=True)
class TrainResult:
    best: Path
    last: Path
    card: ModelCard
    epochs: int
    seconds: float
    history: list[EpochRecord]


def init_head_prior(net: UNet, defect_share: float | Sequence[float]) -> None:
    """Start each output channel at its class's share of pixels instead of 0.5: the early steps
    then learn where defects are rather than that most pixels are good (RetinaNet's prior
    init). One share for all channels, or one per channel."""
    bias = net.head.bias
    if bias is None:
        return
    shares = [defect_share] * bias.numel() if isinstance(defect_share, float) else defect_share
    with torch.no_grad():
        for k, share in enumerate(shares):
            p = min(max(share, 1e-3), 0.5)
            bias[k] = math.log(p / (1.0 - p))


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (oneDNN with AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def lr_factor(progress: float, warmup: float, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``progress`` in [0, 1] of the run:
    linear warm-up over the first ``warmup`` fraction, then cosine down to ``min_ratio``."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    t = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def _selection_score(ev: Evaluation, select_by: SelectBy, epoch: int) -> float:
    """What ``best.pt`` keeps the highest of. ``last``: the epoch itself, so every validated
    epoch replaces the one before and ``best.pt`` ends as the final epoch (always validated)."""
    if select_by == "last":
        return float(epoch)
    auroc = ev.report.auroc
    if select_by == "dice+auroc" and not math.isnan(auroc):
        return ev.best_dice + auroc
    return ev.best_dice


def _auroc_or_none(ev: Evaluation) -> float | None:
    """The image AUROC for ``history.jsonl``, rounded; None on a split without good images
    (all-defective sets), where it is undefined: JSON has no NaN."""
    return None if math.isnan(ev.report.auroc) else round(ev.report.auroc, 5)


def _normalisation_of(images: np.ndarray, channels: int) -> Normalisation:
    """Mean and standard deviation per channel of a ``(N, H, W[, 3])`` uint8 block."""
    flat = images.reshape(-1, channels).astype(np.float64) / 255.0
    mean = tuple(round(float(v), 4) for v in flat.mean(axis=0))
    std = tuple(round(max(float(v), 1e-3), 4) for v in flat.std(axis=0))
    return Normalisation(scale=255.0, mean=mean, std=std)


def _init_normalisation(state: dict[str, Any], channels: int) -> Normalisation | None:
    """The init checkpoint's normalisation when it has ``channels`` channels."""
    try:
        norm = Normalisation.model_validate(state["card"]["normalisation"])
    except (KeyError, TypeError, ValueError):
        return None
    return norm if len(norm.mean) == channels else None


def _refit_exported(state: dict[str, Any], images: SegmentationSet, norm: Normalisation) -> None:
    """Batch norms of a model read from its export get the statistics of the first training
    images (``recover.refit_norms``), so that training starts from the exported map. Not
    for another channel count: the export's first layer is not loaded then, nor can it read
    these images."""
    net = UNet(UNetConfig(**state["unet"]))
    if net.config.in_channels != images.fit.channels:
        return
    net.load_state_dict(state["model"])
    sample = images.images[:REFIT_IMAGES]
    batches = (
        torch.from_numpy(np.stack([norm.apply(to_chw(im)) for im in sample[i : i + 16]]))
        for i in range(0, len(sample), 16)
    )
    count = refit_norms(net, batches)
    state["model"] = net.state_dict()
    log.info("train_init_refit", images=count)


def _widened(
    state: dict[str, Any], net: UNet, path: Path
) -> tuple[Mapping[str, torch.Tensor], tuple[str, ...]]:
    """The init checkpoint's weights, embedded in ``net`` when it is the same U-Net but wider
    (``--base 16`` from a base-8 checkpoint); otherwise as they are (and no names)."""
    weights: Mapping[str, torch.Tensor] = state["model"]
    try:
        theirs = UNetConfig(**state["unet"])
    except TypeError:
        return weights, ()
    if theirs.base >= net.config.base or replace(theirs, base=net.config.base) != net.config:
        return weights, ()
    try:
        return widen_state(weights, net)
    except ValueError as exc:
        base = net.config.base
        raise ConfigError(f"--init {path}: cannot widen it to base {base}: {exc}") from exc


def _merge_resume(config: TrainConfig, stored: TrainConfig) -> TrainConfig:
    """Resume with the stored run's settings; only the stopping rules, the thread count and
    the locations (a run folder or data set may have moved) come from ``config``."""
    keep = {"epochs", "time_limit_min", "command", "out", "data", "threads"}
    differing = [
        f.name
        for f in fields(TrainConfig)
        if f.name not in keep and getattr(config, f.name) != getattr(stored, f.name)
    ]
    if differing:
        log.warning("resume_keeps_stored_settings", ignored=differing)
    return replace(
        stored,
        data=config.data,
        out=config.out,
        epochs=config.epochs,
        time_limit_min=config.time_limit_min,
        threads=config.threads,
        command=config.command,
    )


def time_one_step(net: torch.nn.Module, loss_fn: SegLoss, config: TrainConfig, bf16: bool) -> float:
    """Seconds of one training step (forward, backward; no optimiser step), measured on a copy
    of ``net`` with a random batch of the run's shape, so the run itself is untouched (same
    weights, same random streams). The second of two steps is timed (the first warms up)."""
    probe = copy.deepcopy(net).train()
    gen = torch.Generator().manual_seed(0)
    side_h = config.crop or config.height
    side_w = config.crop or config.width
    x = torch.rand((config.batch_size, config.channels, side_h, side_w), generator=gen)
    k = len(config.classes)
    y = (torch.rand((config.batch_size, k, side_h, side_w), generator=gen) > 0.9).float()
    elapsed = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = probe(x.contiguous(memory_format=torch.channels_last))
        loss_fn(logits, y).backward()
        elapsed = time.perf_counter() - t0
    del probe
    return elapsed


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_estimate: Callable[[float, float, int], None] | None = None,
) -> TrainResult:
    """Train per ``config``; see the module docstring for what lands in ``config.out``.

    With ``config.init`` (a checkpoint) the network starts from its tensors that match by name
    and shape (the rest keep their fresh initialisation: a head re-sized for other classes, a
    first layer for other channels); the normalisation is the checkpoint's when it has as many
    channels, so the loaded features see the inputs they were trained on. The card records
    the checkpoint's sha256 and what did not match.

    ``DataError`` for unusable data (named file), ``ConfigError`` for bad settings,
    ``ModelError`` when ``resume`` finds no usable ``last.pt`` or ``init`` no checkpoint.
    """
    out = config.out
    last_path, best_path, history_path = out / "last.pt", out / "best.pt", out / "history.jsonl"
    state: dict[str, Any] | None = None
    if resume:
        state = read_checkpoint(last_path)
        config = _merge_resume(config, TrainConfig.from_dict(state["config"]))
    config.check()
    init_state = None
    if state is None and config.init is not None:
        init_state = read_init(config.init)
    torch.set_num_threads(config.threads or usable_cores())
    torch.manual_seed(config.seed)
    bf16 = bf16_supported() if config.bf16 is None else config.bf16

    # ---- data
    dataset = open_dataset(config.data)
    if config.classes == ("auto",):
        found = dataset.defect_classes()
        if not found:
            raise DataError(f"{config.data}: --classes auto found no defect class in the data")
        config = replace(config, classes=found)
        config.check()
    train_samples = dataset.samples(config.train_split)
    val_samples = dataset.samples(config.val_split)
    if _seen_note(dataset, config):
        log.warning(
            "val_is_trained_on",
            train_split=config.train_split,
            val_split=config.val_split,
            hint="val metrics measure seen images; fix the point (export --threshold)",
        )
    fit = InputFit(config.channels, config.height, config.width, config.resize)
    aug = AUGMENT_PRESETS[config.augment]
    t_load = time.perf_counter()
    train_set = SegmentationSet(
        dataset,
        train_samples,
        fit,
        Normalisation(),  # replaced below, once the split's statistics are known
        augment=Augment(aug) if config.augment != "off" else None,
        crop=config.crop,
        seed=config.seed,
        classes=config.classes,
    )
    if not train_set.defective.any():
        raise DataError(f"{config.data}: split {config.train_split!r} has no defective image")
    init_norm = None if init_state is None else _init_normalisation(init_state, config.channels)
    if state is not None:
        norm = Normalisation.model_validate(state["card"]["normalisation"])
    elif init_norm is not None:
        norm = init_norm
    else:
        norm = _normalisation_of(train_set.images, config.channels)
    train_set.normalisation = norm
    steps_per_epoch = config.steps_per_epoch or max(1, len(train_set) // config.batch_size)
    sampler = DefectBalancedSampler(
        train_set.defective,
        defect_fraction=config.defect_fraction,
        num_samples=steps_per_epoch * config.batch_size,
        seed=config.seed,
        kinds=[s.cls for s in train_set.samples] if config.balance_classes else None,
        hard_mining=config.hard_mining,
    )
    loader = train_loader(train_set, sampler, config.batch_size)
    draw_labels = [
        (s.cls or "defective") if bad else "good"
        for s, bad in zip(train_set.samples, train_set.defective, strict=True)
    ]
    log.info(
        "train_data",
        data=str(config.data),
        train=len(train_set),
        defective=int(train_set.defective.sum()),
        val=len(val_samples),
        load_s=round(time.perf_counter() - t_load, 1),
        normalisation=norm.model_dump(),
        draws=sampler.shares(draw_labels),
    )

    # ---- model, optimiser, loss
    net = channels_last(UNet(config.unet()))
    init_info: InitInfo | None = None
    head_loaded = False
    if init_state is not None and config.init is not None:
        if config.init.suffix == ".onnx":
            _refit_exported(init_state, train_set, norm)
        init_weights, widened = _widened(init_state, net, config.init)
        loaded = load_matching(net, init_weights)
        notes = tuple(f"{n}: {why}" for n, why in loaded.initialised)
        if widened:
            notes += (
                f"{len(widened)} tensors widened from base {init_state['unet']['base']} to "
                f"{net.config.base}: the checkpoint's channels first, the new ones initialised "
                "and read by the old ones with weight zero (the same map at the start)",
            )
        init_info = InitInfo(
            checkpoint=str(config.init),
            sha256=file_sha256(config.init),
            loaded=len(loaded.loaded),
            initialised=notes,
        )
        head_loaded = loaded.head_loaded
        log.info(
            "train_init",
            checkpoint=str(config.init),
            report=loaded.summary(),
            widened=len(widened),
        )
        weights = {name for name, p in net.named_parameters() if p.ndim > 1}
        if not weights & set(loaded.loaded):
            raise ConfigError(
                f"--init {config.init}: no layer matches this network by name and shape "
                f"({loaded.summary()}); give the checkpoint's --base/--depth/--channels"
            )
    if state is None and not head_loaded:
        shares = train_set.class_shares()
        init_head_prior(net, shares[0] if len(shares) == 1 else shares)
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    loss_fn = SegLoss(LossConfig(kind=config.loss, pos_weight=config.pos_weight))
    name = config.name or out.name
    card = ModelCard(
        name=name,
        architecture={"type": "unet", **config.unet().as_dict()},
        input=InputSpec(
            channels=config.channels,  # type: ignore[arg-type]
            height=config.height,
            width=config.width,
            resize=config.resize,
        ),
        normalisation=norm,
        classes=config.classes,
        training=TrainingInfo(
            data=str(config.data),
            split=config.train_split,
            images=len(train_set),
            epochs=0,
            seed=config.seed,
            command=config.command,
            init=init_info,
        ),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )

    # ---- resume
    total_steps = config.epochs * steps_per_epoch
    step, start_epoch, best_score, spent = 0, 0, -math.inf, 0.0
    history: list[EpochRecord] = []
    average = WeightAverage() if config.average_last > 0 else None
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, start_epoch = int(state["step"]), int(state["epoch"])
        best_score, spent = float(state["best"]), float(state["seconds"])
        history = [EpochRecord(**h) for h in state.get("history", [])]
        if average is not None and state.get("average"):
            average.load_state_dict(state["average"])
        if state.get("sampler"):
            sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        log.info("train_resumed", epoch=start_epoch, step=step, best=best_score)
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        history_path.write_text("")

    limit_s = config.time_limit_min * 60.0 if config.time_limit_min else None
    warmup = min(0.3, config.warmup_epochs / config.epochs)
    t_start = time.perf_counter() - spent

    def progress_now() -> float:
        p = step / total_steps
        if limit_s is not None:
            p = max(p, (time.perf_counter() - t_start) / limit_s)
        return min(1.0, p)

    log.info(
        "train_start",
        out=str(out),
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        bf16=bf16,
        threads=torch.get_num_threads(),
        params=sum(p.numel() for p in net.parameters()),
    )
    step_s = time_one_step(net, loss_fn, config, bf16)
    estimate_s = step_s * (total_steps - step)
    if limit_s is not None:
        estimate_s = min(estimate_s, max(0.0, limit_s - spent))
    log.info(
        "train_estimate",
        step_s=round(step_s, 4),
        steps=total_steps - step,
        estimate_min=round(estimate_s / 60, 1),
        time_limit_min=config.time_limit_min,
    )
    if on_estimate is not None:
        on_estimate(estimate_s, step_s, total_steps - step)

    def validate(network: UNet) -> Evaluation:
        return evaluate(
            dataset,
            config.val_split,
            TorchPredictor(network, bf16=bf16),
            card,
            threshold=0.5,
            score=config.image_score,
        )

    epoch = start_epoch
    net.train()
    while epoch < config.epochs and progress_now() < 1.0:
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch)
        loss_sum, n_loss = 0.0, 0
        lr = config.lr
        for i, (x, y) in enumerate(loader):
            lr = config.lr * lr_factor(progress_now(), warmup, config.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = net(x.contiguous(memory_format=torch.channels_last))
            loss = loss_fn(logits, y)
            if config.hard_mining > 0.0:
                drawn = sampler.drawn[i * config.batch_size : (i + 1) * config.batch_size]
                sampler.record(drawn, per_image_loss(logits, y).tolist())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(loss.item())
            n_loss += 1
            if on_step is not None:
                on_step(
                    StepInfo(epoch, step, steps_per_epoch, loss_sum / n_loss, lr, progress_now())
                )
            if progress_now() >= 1.0 and i + 1 < steps_per_epoch:
                break  # out of time: validate what we have
        epoch += 1
        last_epoch = epoch >= config.epochs or progress_now() >= 1.0
        if average is not None and (last_epoch or progress_now() > 1.0 - config.average_last):
            average.add(net)
        # The final model: the averaged weights, when averaging; the network as trained else.
        judged = net
        if last_epoch and average is not None:
            judged = average.network(net, loader, bf16=bf16)
            log.info("train_averaged", epochs=average.count, share=config.average_last)
        record = EpochRecord(
            epoch=epoch,
            step=step,
            lr=lr,
            loss=round(loss_sum / max(1, n_loss), 5),
            seconds=0.0,
        )
        if epoch % config.val_every == 0 or last_epoch:
            ev = validate(judged)
            record.val = {
                "dice": round(ev.best_dice, 5),
                "threshold": ev.best_threshold,
                "dice@0.5": round(ev.report.overall.dice, 5),
                "iou@0.5": round(ev.report.overall.iou, 5),
                "auroc": _auroc_or_none(ev),
            }
            if judged is not net and average is not None:  # beside the mean: the last epoch
                raw = validate(net)
                record.val["averaged_epochs"] = average.count
                record.val["last_epoch_dice"] = round(raw.best_dice, 5)
                record.val["last_epoch_auroc"] = _auroc_or_none(raw)
            score = _selection_score(ev, config.select_by, epoch)
            if score > best_score:
                best_score = score
                save_checkpoint(best_path, judged, card, epoch=epoch, step=step, best=best_score)
                record.val["best"] = True
        record.seconds = round(time.perf_counter() - t_start, 1)
        history.append(record)
        with history_path.open("a") as fh:
            fh.write(json.dumps(asdict(record)) + "\n")
        save_checkpoint(
            last_path,
            net,
            card,
            config=config.as_dict(),
            optimizer=opt.state_dict(),
            step=step,
            epoch=epoch,
            best=best_score,
            seconds=time.perf_counter() - t_start,
            history=[asdict(h) for h in history],
            torch_rng=torch.get_rng_state(),
            average=None if average is None else average.state_dict(),
            sampler=sampler.state_dict() if config.hard_mining > 0.0 else None,
        )
        if config.hard_mining > 0.0:  # what this epoch drew, by kind (the mined shares)
            log.info("train_draws", epoch=epoch, draws=sampler.shares(draw_labels))
        log.info("epoch_done", **asdict(record))
        if on_epoch is not None:
            on_epoch(record)

    seconds = time.perf_counter() - t_start
    final = finish_card(best_path, dataset, config, epochs=epoch, seconds=seconds)
    log.info("train_done", best=str(best_path), epochs=epoch, seconds=round(seconds, 1))
    return TrainResult(best_path, last_path, final, epoch, seconds, history)


def finish_card(
    best_path: Path, dataset: Dataset, config: TrainConfig, *, epochs: int, seconds: float
) -> ModelCard:
    """Complete the card inside ``best.pt``: threshold with the best validation Dice (float32
    inference), validation metrics at that threshold, training-data hash, epochs, duration,
    and the drift reference (image statistics of the training split, ``defectd.data.drift``)."""
    state = read_checkpoint(best_path)
    net = UNet(UNetConfig(**state["unet"]))
    net.load_state_dict(state["model"])
    net = channels_last(net).eval()
    card = ModelCard.model_validate(state["card"])
    preds = list(
        predict(dataset, dataset.samples(config.val_split), TorchPredictor(net, bf16=False), card)
    )
    point = validation_point(preds, card, config.image_score)
    training = card.training.model_copy(
        update={
            "data_hash": dataset.fingerprint(config.train_split),
            "epochs": epochs,
            "duration_s": round(seconds, 1),
        }
    )
    final = card.model_copy(
        update={
            **point,
            "training": training,
            "drift": dataset_reference(dataset, config.train_split, card.input.channels),
            "notes": f"threshold (best Dice) and min_area_px (best image accuracy) chosen on "
            f"split {config.val_split!r}{', per class' if point['per_class'] else ''}; "
            f"image score for AUROC: {config.image_score}{_seen_note(dataset, config)}",
        }
    )
    extra = {k: v for k, v in state.items() if k not in ("model", "unet", "card")}
    save_checkpoint(best_path, net, final, **extra)
    return final


def _seen_note(dataset: Dataset, config: TrainConfig) -> str:
    """A warning for the card's notes when validation images were also trained on (a refit
    on ``train+val``): its metrics and point are then measured on seen images."""
    seen = dataset.shared(config.train_split, config.val_split)
    if not seen:
        return ""
    return (
        f"; {seen} of the {config.val_split!r} images were trained on "
        f"({config.train_split!r}): these val metrics and this point are measured on seen images"
    )


def validation_point(
    preds: Sequence[Prediction], card: ModelCard, score: ImageScore = "max"
) -> dict[str, Any]:
    """The card fields chosen on validation predictions: ``threshold`` and ``min_area_px``
    (:func:`choose_operating_point`, or per class), ``per_class`` and the ``metrics`` there
    (``val_*``; AUROC left out on a split without good images)."""
    per_class: dict[str, ClassPoint] = {}
    if card.multiclass:
        per_class, report, class_metrics = choose_class_points(preds, card, score)
        threshold = min(p.threshold for p in per_class.values())
        min_area = min(p.min_area_px for p in per_class.values())
    else:
        threshold, min_area, report = choose_operating_point(preds, score)
        class_metrics = {}
    metrics = {
        f"val_{k}": float(v)
        for k, v in report.overall.as_dict().items()
        if isinstance(v, float) and k not in ("images", "defective")
    }
    metrics.update(class_metrics)
    if math.isfinite(report.auroc):
        metrics["val_auroc"] = float(report.auroc)
    return {
        "threshold": threshold,
        "min_area_px": min_area,
        "per_class": per_class,
        "metrics": {k: round(v, 5) for k, v in metrics.items() if math.isfinite(v)},
    }


MIN_AREA_CANDIDATES = (0, 4, 8, 16, 32, 64, 128)


def choose_operating_point(
    preds: Sequence[Prediction], score: ImageScore = "max"
) -> tuple[float, int, Report]:
    """Threshold with the best split Dice, then the min-area (px at native resolution) with the
    best image accuracy at that threshold (ties: the smaller area); and the report there."""
    sweep = MetricsAccumulator()
    for p in preds:
        sweep.add(p.prob, p.mask)
    threshold, _ = sweep.best_threshold()
    best: tuple[float, int, Report] | None = None
    for area in MIN_AREA_CANDIDATES:
        acc = MetricsAccumulator(
            threshold=threshold, min_area_px=area, score=score, keep_sweep=False
        )
        for p in preds:
            acc.add(p.prob, p.mask, stem=p.sample.stem, cls=p.sample.cls)
        report = acc.report()
        if best is None or report.overall.accuracy > best[2].overall.accuracy:
            best = (threshold, area, report)
    assert best is not None
    return best


def choose_class_points(
    preds: Sequence[Prediction], card: ModelCard, score: ImageScore = "max"
) -> tuple[dict[str, ClassPoint], Report, dict[str, float]]:
    """A multi-class model's operating point per class, each chosen on its own channel as
    :func:`choose_operating_point` chooses the one-class point (threshold with the best Dice,
    then the min area with the best accuracy of "image holds this class"); the any-defect
    report at those points; and per-class metrics for the card (``val_iou_<class>``,
    ``val_dice_<class>``, ``val_mean_iou``)."""
    points: dict[str, ClassPoint] = {}
    for k, name in enumerate(card.classes):
        view = []
        for p in preds:
            assert p.probs is not None and p.masks is not None
            view.append(Prediction(p.sample, p.image, p.masks[k], p.probs[k]))
        t, a, _ = choose_operating_point(view, score)
        points[name] = ClassPoint(threshold=t, min_area_px=a)
    acc = ClassAccumulator(
        card.classes,
        tuple(points[c].threshold for c in card.classes),
        tuple(points[c].min_area_px for c in card.classes),
    )
    overall = MetricsAccumulator(score=score, keep_sweep=False)
    for p in preds:
        assert p.probs is not None and p.masks is not None
        union = np.asarray(acc.add(p.probs, p.masks).any(axis=0), bool)
        overall.add(p.prob, p.mask, stem=p.sample.stem, cls=p.sample.cls, binary=union)
    classes = acc.report()
    metrics = {"val_mean_iou": classes.mean_iou}
    for name, row in classes.per_class.items():
        metrics[f"val_iou_{name}"] = float(row["iou"])
        metrics[f"val_dice_{name}"] = float(row["dice"])
    return points, overall.report(), metrics
