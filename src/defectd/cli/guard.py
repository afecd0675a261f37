"""Write protection for artefacts the commands produce: models, cards, calibration sections.

A command that writes a model (``export``, ``calibrate int8``) or a section of a calibration
file (``calibrate threshold|camera|flatfield``) refuses to replace an existing one without
``--force``, so a README command run twice, or run against the shipped
``models/magnetic_tile/``, cannot silently replace what a station runs.
"""

from __future__ import annotations

from pathlib import Path

from defectd.errors import ConfigError


def refuse_overwrite(path: Path, *, force: bool, option: str = "--out") -> None:
    """``ConfigError`` when ``path`` exists and ``force`` is not given."""
    if path.exists() and not force:
        raise ConfigError(
            f"{option} {path}: exists; pass --force to replace it (or choose another {option})"
        )


def refuse_section_overwrite(
    path: Path, sections: tuple[str, ...], *, force: bool, option: str = "--out"
) -> None:
    """``ConfigError`` when the calibration file at ``path`` already has one of ``sections``
    and ``force`` is not given; its other sections are kept by every writer anyway."""
    if force or not path.exists():
        return
    from defectd.calibration.file import load_calibration

    current = load_calibration(path)
    present = [s for s in sections if getattr(current, s, None) is not None]
    if present:
        raise ConfigError(
            f"{option} {path}: already has a {' and a '.join(present)} section; pass --force "
            f"to replace it (its other sections are kept)"
        )


__all__ = ["refuse_overwrite", "refuse_section_overwrite"]
