"""The ``defectd`` command-line application; each subcommand lives in its own module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

from defectd import __version__
from defectd.log import LEVELS, configure_logging

if TYPE_CHECKING:
    from defectd.daemon.station import EngineOpener

app = typer.Typer(
    name="defectd",
    help="Real-time defect inspection: cameras -> U-Net -> verdicts -> MQTT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass(frozen=True, slots=True)
class Injected:
    """Parts a caller of ``defectd.cli.main`` hands the commands instead of the real ones
    (``ctx.obj``). Production passes nothing; tests pass, e.g., an engine that can hang."""

    engine_opener: EngineOpener | None = None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"defectd {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    log_level: Annotated[
        str, typer.Option("--log-level", help=f"One of {', '.join(LEVELS)}.")
    ] = "info",
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            help="auto (console on a terminal, JSON lines otherwise), json, console.",
        ),
    ] = "auto",
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Real-time defect inspection: cameras -> U-Net -> verdicts -> MQTT."""
    if log_format not in ("auto", "json", "console"):
        raise typer.BadParameter("choose auto, json or console", param_hint="--log-format")
    try:
        configure_logging(log_level, log_format)  # type: ignore[arg-type]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from exc


def sub_app(name: str, summary: str) -> typer.Typer:
    """A group of subcommands, ``defectd NAME ...``, registered on ``app``: it shows its help
    when called without a subcommand and takes ``-h`` as ``--help``, like ``app``."""
    group = typer.Typer(
        name=name,
        help=summary,
        no_args_is_help=True,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.add_typer(group, name=name)
    return group
