"""``defectd export``: checkpoint -> ONNX with its card, checked against ONNX Runtime."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from defectd.cli.app import app
from defectd.cli.guard import refuse_overwrite
from defectd.cli.options import JsonSummary
from defectd.errors import ConfigError, DataError
from defectd.extras import require_extra
from defectd.model.card import ModelCard, card_path

PARITY_TOLERANCE = 1e-4


@app.command("export")
def export_command(
    *,
    checkpoint: Annotated[
        list[Path],
        typer.Option(
            "--checkpoint",
            "-c",
            help="Training checkpoint, e.g. RUN/best.pt. Given several times: one model whose "
            "output is the mean of their probabilities (a seed ensemble).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="ONNX file to write, e.g. models/NAME/model.onnx."),
    ],
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).")] = 18,
    name: Annotated[
        str, typer.Option(help="Model name in the card (default: the checkpoint's).")
    ] = "",
    note: Annotated[
        str, typer.Option(help="Text added to the card's notes (e.g. how the data was made).")
    ] = "",
    data: Annotated[
        Path | None,
        typer.Option(
            help="Dataset whose val split chooses the card's threshold (best Dice) and min "
            "area (best image accuracy) through the exported model, as training chooses them, "
            "and gives the card's val metrics. Meant for an ensemble, whose card has none.",
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Fix the card's pixel threshold (0..1) instead of the checkpoint's: for a "
            "recipe whose point is settled, e.g. refitted with --train-split train+val, where "
            "no unseen val split is left to choose one.",
        ),
    ] = None,
    min_area: Annotated[
        int | None,
        typer.Option("--min-area", help="Fix the card's min_area_px with --threshold."),
    ] = None,
    flips: Annotated[
        str,
        typer.Option(
            "--flips",
            help="Average the output over flipped views of the input, inside the graph: none, "
            "h (the image and its left-right mirror, 2x the inference), v (up-down), hv (all "
            "four, 4x). Every engine, eval, calibration and the daemon then run the average.",
        ),
    ] = "none",
    parity_batch: Annotated[
        int, typer.Option("--parity-batch", help="Random images in the parity check.")
    ] = 2,
    as_json: JsonSummary = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --out model and its card.")
    ] = False,
) -> None:
    """Export a checkpoint to ONNX, with the model card beside it.

    The graph ends in a sigmoid (probabilities), has a dynamic batch and fixed height/width.

    The card carries the checkpoint's threshold, metrics, data hash and training command.

    Parity: one random batch through torch and ONNX Runtime; a max abs difference above 1e-4
    is an error (the file is kept for inspection).

    Several checkpoints (runs of one recipe with different seeds) make one model that averages
    their probability maps; they must match in architecture, input, normalisation, classes and
    training data. Its card holds no metrics: evaluate and calibrate the exported model.

    --flips averages over flipped views as well (test-time augmentation); the card's
    architecture names them, and its threshold is the checkpoint's until --data or
    `defectd calibrate threshold` chooses one for the averaged maps (they peak lower).
    """
    require_extra("train", "defectd export")
    from defectd.model.checkpoint import load_checkpoint
    from defectd.model.ensemble import ensemble_card
    from defectd.model.export import export_onnx
    from defectd.model.views import VIEWS, check_flips
    from defectd.training.evaluate import onnx_parity

    # The exporter logs a warning for each torchvision op it cannot register; none are used.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    views = check_flips(flips)
    _check_point(threshold, min_area, data)
    refuse_overwrite(out, force=force)
    loaded = [load_checkpoint(path) for path in checkpoint]
    nets = [net for net, _ in loaded]
    card = ensemble_card([(path, c) for path, (_, c) in zip(checkpoint, loaded, strict=True)])
    if name:
        card = card.model_copy(update={"name": name})
    if threshold is not None and card.multiclass:
        raise ConfigError(
            "--threshold/--min-area: a multi-class model has a point per class; choose them "
            "with `defectd calibrate threshold`"
        )
    averaged = (
        f"flipped views averaged in the graph ({views}: {len(VIEWS[views])}x the inference of "
        "the network)"
        if views != "none"
        else ""
    )
    notes = "; ".join(n for n in (card.notes, averaged, note) if n)
    if notes != card.notes:
        card = card.model_copy(update={"notes": notes})
    final = export_onnx(nets, card, out, opset=opset, flips=views)
    diff = onnx_parity(nets, final, out, batch=parity_batch, tolerance=PARITY_TOLERANCE)
    if data is not None:
        final = _choose_on_val(out, final, data)
    elif threshold is not None and min_area is not None:
        final = _fix_point(out, final, threshold, min_area)
    size_mb = out.stat().st_size / 1e6
    summary = {
        "onnx": str(out),
        "card": str(out.with_name(out.stem + ".card.json")),
        "sha256": final.sha256,
        "opset": opset,
        "size_mb": round(size_mb, 3),
        "parity_max_abs_diff": diff,
        "input": final.input.model_dump(),
        "members": len(nets),
        "flips": views,
        "threshold": final.threshold,
        "min_area_px": final.min_area_px,
        "metrics": final.metrics,
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(
        f"exported {', '.join(map(str, checkpoint))} -> {out} ({size_mb:.2f} MB, opset {opset}, "
        f"input {final.input.channels}x{final.input.height}x{final.input.width}); "
        f"parity torch vs ONNX Runtime: max abs diff {diff:.2e} (<= {PARITY_TOLERANCE:g})"
    )


def _check_point(threshold: float | None, min_area: int | None, data: Path | None) -> None:
    """Refuse a half-given or out-of-range fixed point, or one given with --data, before any
    work."""
    if (threshold is None) != (min_area is None):
        raise ConfigError("--threshold and --min-area: give both to fix the card's point")
    if threshold is None or min_area is None:
        return
    if data is not None:
        raise ConfigError("--threshold/--min-area fix the point; --data chooses it: give one")
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"--threshold {threshold:g}: a probability between 0 and 1")
    if min_area < 0:
        raise ConfigError(f"--min-area {min_area}: a pixel count, 0 or more")


def _fix_point(out: Path, card: ModelCard, threshold: float, min_area: int) -> ModelCard:
    """``card`` with the operating point given on the command line; saved. Validation metrics
    measured at another point are dropped: they do not describe this one (a multi-class card
    was refused before the export)."""
    same = (card.threshold, card.min_area_px) == (threshold, min_area)
    note = f"threshold {threshold:g} and min_area_px {min_area} fixed at export (--threshold)"
    fixed = card.model_copy(
        update={
            "threshold": threshold,
            "min_area_px": min_area,
            "metrics": card.metrics if same else {},
            "notes": "; ".join(n for n in (card.notes, note) if n),
        }
    )
    fixed.save(card_path(out))
    return fixed


def _choose_on_val(out: Path, card: ModelCard, data: Path) -> ModelCard:
    """``card`` with the operating point and metrics chosen on ``data``'s val split through
    the exported model (ONNX Runtime, float32: what the station runs at fp32); saved."""
    from defectd.data.datasets import open_dataset
    from defectd.training.evaluate import open_model, predict
    from defectd.training.train import validation_point

    dataset = open_dataset(data)
    opened = open_model(out, backend="ort", precision="fp32")
    try:
        preds = list(predict(dataset, dataset.samples("val"), opened.predictor, card))
    finally:
        opened.close()
    if not preds:
        raise DataError(f"{data}: the val split is empty; nothing to choose the threshold on")
    point = validation_point(preds, card)
    note = (
        f"threshold (best Dice) and min_area_px (best image accuracy) chosen on split 'val' of "
        f"{data} through this file (ort-fp32); image score for AUROC: max"
    )
    chosen = card.model_copy(
        update={**point, "notes": "; ".join(n for n in (card.notes, note) if n)}
    )
    chosen.save(card_path(out))
    return chosen
