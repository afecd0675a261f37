"""``defectd card``: write or check the model card (``model.card.json``) of an ONNX model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from defectd.cli.app import sub_app
from defectd.cli.console import report_console
from defectd.errors import ConfigError

card_app = sub_app(
    "card",
    "Write or check the card (model.card.json) of an ONNX model; format: docs/model-card.md.",
)

ModelArg = Annotated[Path, typer.Argument(help="The ONNX model file.", show_default=False)]


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{option}: comma-separated numbers, got {text!r}") from None
    return values


@card_app.command("write")
def write(
    *,
    model: ModelArg,
    mean: Annotated[
        str | None,
        typer.Option(
            help="Per-channel mean of pixel/scale the model was trained with, "
            "e.g. 0.485,0.456,0.406."
        ),
    ] = None,
    std: Annotated[
        str | None, typer.Option(help="Per-channel std of pixel/scale, e.g. 0.229,0.224,0.225.")
    ] = None,
    scale: Annotated[
        float, typer.Option(help="Pixels are divided by this first (uint8: 255).")
    ] = 255.0,
    fit: Annotated[
        str,
        typer.Option(
            help="How other image sizes reach the input: resize, pad or tile (native scale)."
        ),
    ] = "resize",
    threshold: Annotated[float, typer.Option(help="Pixel probability threshold (0..1).")] = 0.5,
    min_area: Annotated[int, typer.Option("--min-area", help="Smallest defect in pixels.")] = 0,
    name: Annotated[str | None, typer.Option(help="Model name (default: the file stem).")] = None,
    channels: Annotated[int | None, typer.Option(help="Only for a dynamic input: 1 or 3.")] = None,
    height: Annotated[int | None, typer.Option(help="Only for a dynamic input height.")] = None,
    width: Annotated[int | None, typer.Option(help="Only for a dynamic input width.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing card.")] = False,
) -> None:
    """Write MODEL's card after inspecting the ONNX input/output and running it once.

    The normalisation cannot be read from the file: give --mean and --std (asked for on a
    terminal). The card is kept only if the model runs with it and returns probabilities.
    """
    from defectd.engines.card_tool import write_card
    from defectd.model.fit import FIT_POLICIES

    if fit not in FIT_POLICIES:
        raise ConfigError(f"--fit: choose {', '.join(FIT_POLICIES)}, not {fit!r}")
    if mean is None or std is None:
        if not sys.stdin.isatty():
            raise ConfigError(
                "--mean/--std: give the normalisation the model was trained with "
                "(x = (pixel/scale - mean) / std per channel)"
            )
        mean = mean or typer.prompt(
            "mean of pixel/scale per channel (e.g. 0.5 or 0.485,0.456,0.406)"
        )
        std = std or typer.prompt("std of pixel/scale per channel (e.g. 0.25 or 0.229,0.224,0.225)")
    path, result = write_card(
        model,
        name=name,
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
        scale=scale,
        fit=fit,
        threshold=threshold,
        min_area_px=min_area,
        channels=channels,
        height=height,
        width=width,
        force=force,
    )
    spec = result.card.input
    report_console().print(
        f"wrote {path}: input {spec.channels}x{spec.height}x{spec.width} ({spec.resize}), "
        f"output {result.output_shape[1:]} probabilities "
        f"{result.prob_min:.3f}..{result.prob_max:.3f} on {result.engine}",
        markup=False,
    )


@card_app.command("check")
def check(
    model: ModelArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Check MODEL's card: valid, agrees with the ONNX input, and the model runs with it and
    returns probabilities (ONNX Runtime). Exit 2 naming the problem otherwise."""
    from defectd.engines.card_tool import check_card

    result = check_card(model)
    summary = {
        "ok": True,
        "model": str(model),
        "name": result.card.name,
        "input": result.card.input.model_dump(),
        "normalisation": result.card.normalisation.model_dump(),
        "threshold": result.card.threshold,
        "min_area_px": result.card.min_area_px,
        "output_shape": list(result.output_shape),
        "probabilities": [result.prob_min, result.prob_max],
        "engine": result.engine,
        "sha256_matches": result.sha256_ok,
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    for key, value in summary.items():
        report_console().print(f"{key}: {value}", markup=False)
    if result.sha256_ok is False:
        report_console(stderr=True).print(
            "warning: the card's sha256 is not this file's (the model changed since the card "
            "was written)"
        )
