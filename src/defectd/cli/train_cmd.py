"""``defectd train``: train a U-Net on a dataset folder, keeping the best checkpoint."""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from defectd.cli.app import app
from defectd.cli.options import DatasetIn, JsonSummary
from defectd.errors import ConfigError
from defectd.extras import require_extra


def command_line() -> str:
    """The command as typed, with the program name normalised to ``defectd``."""
    return shlex.join(["defectd", *sys.argv[1:]])


@dataclass(frozen=True)
class Architecture:
    """The network and input options a fine-tune takes from its ``--init`` checkpoint."""

    size: str = "256"
    resize: str = "resize"
    channels: int = 1
    base: int = 16
    depth: int = 4
    norm: str = "batch"


def _architecture(init: Path | None, **given: Any) -> Architecture:
    """The architecture options: those given, else the ``--init`` checkpoint's (so that a
    fine-tune loads every tensor unless told otherwise), else the defaults."""
    arch = Architecture()
    if init is not None:
        from defectd.model.recover import read_init

        state = read_init(init)
        unet, spec = state.get("unet") or {}, (state.get("card") or {}).get("input") or {}
        found: dict[str, Any] = {
            "size": f"{spec['height']}x{spec['width']}" if "height" in spec else None,
            "resize": spec.get("resize") if spec.get("resize") in ("resize", "pad") else None,
            "channels": spec.get("channels"),
            "base": unet.get("base"),
            "depth": unet.get("depth"),
            "norm": unet.get("norm"),
        }
        arch = replace(arch, **{k: v for k, v in found.items() if v is not None})
    return replace(arch, **{k: v for k, v in given.items() if v is not None})


@app.command("train")
def train_command(
    *,
    data: DatasetIn,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder: best.pt, last.pt, history.jsonl.")
    ],
    epochs: Annotated[int, typer.Option(help="Epochs (passes of --steps-per-epoch steps).")] = 40,
    size: Annotated[
        str | None,
        typer.Option(
            help="Model input: N (square) or HxW, multiples of 2**depth [default: 256, or the "
            "--init checkpoint's]."
        ),
    ] = None,
    resize: Annotated[
        str | None,
        typer.Option(
            help="How images reach the input size: resize or pad [default: resize, or the "
            "--init checkpoint's]."
        ),
    ] = None,
    channels: Annotated[
        int | None,
        typer.Option(help="1 (grey) or 3 (RGB) [default: 1, or the --init checkpoint's]."),
    ] = None,
    base: Annotated[
        int | None,
        typer.Option(help="U-Net width of the first stage [default: 16, or --init's]."),
    ] = None,
    depth: Annotated[
        int | None, typer.Option(help="U-Net down-sampling steps [default: 4, or --init's].")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW decay.")] = 1e-4,
    loss: Annotated[
        str,
        typer.Option(
            help="bce_dice, bce_dice_img (+ per-image Dice), bce_dice_part (+ a part-level "
            "term: each image's strongest pixels against whether it has a defect), "
            "focal_dice, bce_tversky or bce."
        ),
    ] = "bce_dice",
    defect_fraction: Annotated[
        float,
        typer.Option("--defect-fraction", help="Share of defective images drawn per epoch."),
    ] = 0.5,
    balance_classes: Annotated[
        bool,
        typer.Option(
            "--balance-classes",
            help="Give every defect kind (the manifest's class of each image) an equal share "
            "of the defective draws, so rare kinds are seen as often as common ones.",
        ),
    ] = False,
    hard_mining: Annotated[
        float,
        typer.Option(
            "--hard-mining",
            help="0-1: draw images the network still gets wrong more often (by each image's "
            "last loss, within good and within defective images); 0: off.",
        ),
    ] = 0.0,
    steps_per_epoch: Annotated[
        int | None,
        typer.Option("--steps-per-epoch", help="Steps per epoch (default: split size / batch)."),
    ] = None,
    crop: Annotated[
        int | None, typer.Option(help="Train on crops of this size (validation: whole images).")
    ] = None,
    augment: Annotated[
        str,
        typer.Option(
            help="flip (mirror images), default (+ rotations, scale, photometric), light (no"
            " rotations) or off."
        ),
    ] = "flip",
    train_split: Annotated[
        str,
        typer.Option(
            "--train-split",
            help="Split(s) to train on; 'train+val' refits a settled recipe on every labelled "
            "image it was tuned with (val then measures nothing new: use --select-by last and "
            "fix the operating point with `defectd export --threshold T --min-area PX`).",
        ),
    ] = "train",
    val_split: Annotated[
        str, typer.Option("--val-split", help="Split that validates and chooses the point.")
    ] = "val",
    val_every: Annotated[int, typer.Option("--val-every", help="Validate every N epochs.")] = 1,
    select_by: Annotated[
        str,
        typer.Option(
            "--select-by",
            help="best.pt: the epoch with the best val 'dice' or 'dice+auroc', or the 'last'"
            " (final) epoch; its card is completed on val either way.",
        ),
    ] = "dice",
    average_last: Annotated[
        float,
        typer.Option(
            "--average-last",
            help="Final model = mean of the weights after each epoch in this last share of the"
            " run (e.g. 0.25), batch-norm statistics recomputed; 0: the last epoch as trained.",
        ),
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of weights, sampling and augmentation.")] = 0,
    time_limit: Annotated[
        float | None,
        typer.Option(
            "--time-limit", help="Stop after MIN minutes; the schedule then follows wall time."
        ),
    ] = None,
    bf16: Annotated[
        bool | None,
        typer.Option("--bf16/--no-bf16", help="bfloat16 autocast (default: when the CPU has it)."),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: all cores).")] = None,
    name: Annotated[str, typer.Option(help="Model name in the card (default: run folder).")] = "",
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Fine-tune: start from this checkpoint (.pt) or exported model (.onnx, card "
            "beside it). Tensors that match by name and shape are loaded, the others initialised "
            "(e.g. a head for other classes); a larger --base widens the checkpoint's network "
            "(same map at the start); the card records its sha256. Architecture options not "
            "given are the checkpoint's.",
        ),
    ] = None,
    classes: Annotated[
        str,
        typer.Option(
            help="defect (one output: every defect pixel), auto (one output per class of the "
            "data: class-index masks or the manifest's cls), or names: a,b,c."
        ),
    ] = "defect",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from last.pt.")
    ] = False,
    as_json: JsonSummary = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Start over in an --out that holds an earlier run."),
    ] = False,
) -> None:
    """Train a U-Net that segments defects; keep the checkpoint with the best validation Dice.

    Trains on the 'train' split and validates on 'val' (--train-split, --val-split), at native
    image resolution.

    OUT/best.pt gets the model card: threshold chosen on 'val', metrics, data hash, command.

    With --init FROM.pt it fine-tunes: the run starts from the checkpoint's weights (use a
    lower --lr and fewer epochs than from scratch). FROM.onnx starts from a deployed model
    when its checkpoint is gone; a larger --base grows it into a wider network.

    Next: defectd export --checkpoint OUT/best.pt --out models/NAME/model.onnx
    """
    require_extra("train", "defectd train", ("torch",))
    # Before torch loads: spinning OpenMP workers made each step 2-3x slower on a 2-core
    # machine shared with other processes; waiting passively costs little when it is not.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from defectd.cli.synth_cmd import _parse_size
    from defectd.training.losses import LOSS_KINDS
    from defectd.training.train import EpochRecord, StepInfo, TrainConfig, train

    if not resume and not force and (out / "best.pt").exists():
        raise ConfigError(
            f"--out {out}: holds an earlier run (best.pt); pass --resume to continue it or "
            "--force to start over (its checkpoints are replaced)"
        )
    arch = _architecture(init, size=size, resize=resize, channels=channels, base=base, depth=depth)
    height, width = _parse_size(arch.size)
    resize = arch.resize
    choices = {
        "--resize": (resize, ("resize", "pad")),
        "--loss": (loss, LOSS_KINDS),
        "--augment": (augment, ("default", "light", "flip", "off")),
        "--select-by": (select_by, ("dice", "dice+auroc", "last")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} {value!r}: choose one of {', '.join(allowed)}")
    config = TrainConfig(
        data=data,
        out=out,
        epochs=epochs,
        height=height,
        width=width,
        channels=arch.channels,
        resize=resize,  # type: ignore[arg-type]
        base=arch.base,
        depth=arch.depth,
        norm=arch.norm,  # type: ignore[arg-type]
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        loss=loss,  # type: ignore[arg-type]
        defect_fraction=defect_fraction,
        balance_classes=balance_classes,
        hard_mining=hard_mining,
        steps_per_epoch=steps_per_epoch,
        crop=crop,
        augment=augment,  # type: ignore[arg-type]
        train_split=train_split,
        val_split=val_split,
        val_every=val_every,
        select_by=select_by,  # type: ignore[arg-type]
        average_last=average_last,
        seed=seed,
        time_limit_min=time_limit,
        bf16=bf16,
        threads=threads,
        name=name,
        command=command_line(),
        init=init,
        classes=tuple(c.strip() for c in classes.split(",") if c.strip()),
    )
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(
        *columns, console=console, disable=as_json or not console.is_terminal, transient=False
    ) as bar:
        task = bar.add_task("train", total=1000, status="loading data")
        last_val = ""

        def on_step(info: StepInfo) -> None:
            bar.update(
                task,
                completed=int(info.progress * 1000),
                status=f"epoch {info.epoch + 1} loss {info.loss:.4f} lr {info.lr:.2e}{last_val}",
            )

        def on_epoch(rec: EpochRecord) -> None:
            nonlocal last_val
            if rec.val:
                auroc = rec.val["auroc"]
                last_val = (
                    f" | val dice {rec.val['dice']:.3f} iou@0.5 {rec.val['iou@0.5']:.3f}"
                    f" auroc {'-' if auroc is None else format(auroc, '.3f')}"
                )
            bar.update(task, status=f"epoch {rec.epoch} loss {rec.loss:.4f}{last_val}")

        def on_estimate(seconds: float, step_s: float, steps: int) -> None:
            if as_json:
                return
            limited = config.time_limit_min is not None and seconds < step_s * steps - 1e-6
            console.print(
                f"estimated training time: ~{seconds / 60:.0f} min ({steps} steps x "
                f"{step_s:.2f} s{', capped by --time-limit' if limited else ''}; "
                "validation adds to it)",
                markup=False,
                highlight=False,
            )

        result = train(
            config, resume=resume, on_step=on_step, on_epoch=on_epoch, on_estimate=on_estimate
        )
    summary = {
        "best": str(result.best),
        "epochs": result.epochs,
        "seconds": round(result.seconds, 1),
        "threshold": result.card.threshold,
        "metrics": result.card.metrics,
        "command": result.card.training.command,
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    m = {k: result.card.metrics.get(f"val_{k}", float("nan")) for k in ("dice", "iou", "auroc")}
    typer.echo(
        f"trained {result.epochs} epochs in {result.seconds / 60:.1f} min -> {result.best}: "
        f"val dice {m['dice']:.3f}, iou {m['iou']:.3f}, auroc {m['auroc']:.3f} "
        f"at threshold {result.card.threshold:.2f}"
    )
