"""Optional parts of defectd (pip extras) and the one line a command says when one is missing.

``pip install defectd`` is the station: ``run``, ``demo``, ``watch``, ``cameras``, ``config``,
``synth``, ``engines``/``build-engine`` on the CPU runtimes, ``eval`` and ``calibrate`` of
ONNX models. The rest comes with an extra (``pyproject.toml`` lists their packages):

- ``train``: torch, the ONNX exporter and plots: ``train``, ``export``, ``.pt`` checkpoints
  (``eval``/``calibrate`` of a checkpoint, the ``torch`` engine backend);
- ``plots``: matplotlib alone: ``calibrate threshold --report`` on a station;
- ``gpu``: TensorRT (its wheels come from NVIDIA's index);
- ``opcua``: asyncua and cryptography: the ``[opcua]`` station section, ``defectd opcua``;
- ``triton``: tritonclient (gRPC and HTTP): ``model.backend = "triton"``, a shared server;
- ``dev``: everything above plus the test, lint and packaging tools.

A command checks for its extra with ``require_extra`` before it starts work, so a missing one
is one line (``error: ... pip install defectd[train]``, exit 2 from the CLI) instead of a
traceback. ``missing_extra_error`` turns a ``ModuleNotFoundError`` met later into the same line.
"""

from __future__ import annotations

import importlib.util

from defectd.errors import DefectdError

# extra -> the modules it provides that defectd imports (checked without importing them).
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "onnxscript"),
    "plots": ("matplotlib",),
    "gpu": ("tensorrt",),
    "opcua": ("asyncua", "cryptography"),
    "triton": ("tritonclient",),
}

# top-level module -> the extra that installs it (the first extra that lists it).
MODULE_EXTRA: dict[str, str] = {}
for _extra, _modules in EXTRAS.items():
    for _module in _modules:
        MODULE_EXTRA.setdefault(_module, _extra)


class MissingExtraError(DefectdError):
    """A command needs an optional part of defectd that is not installed."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        self.feature = feature
        self.extra = extra
        self.module = module
        super().__init__(
            f"{feature} needs the [{extra}] extra ({module} is not installed): "
            f"{install_hint(extra)}"
        )


def install_hint(extra: str) -> str:
    """The command that installs ``extra``: ``pip install defectd[EXTRA]``."""
    return f"pip install defectd[{extra}]"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package that is missing, or an import hook that refuses
        return False


def require_extra(extra: str, feature: str, modules: tuple[str, ...] = ()) -> None:
    """Raise ``MissingExtraError`` when a module of ``extra`` cannot be imported.

    ``feature`` names what needs it, as the user asked for it (``"defectd train"``,
    ``"calibrate threshold --report"``); ``modules`` narrows the check to those the feature
    imports (default: all of the extra's). Finds modules without importing them.
    """
    for module in modules or EXTRAS[extra]:
        if not _importable(module):
            raise MissingExtraError(feature, extra, module)


def missing_extra_error(exc: ModuleNotFoundError, feature: str) -> MissingExtraError | None:
    """The ``MissingExtraError`` for ``exc`` when its module belongs to an extra, else None."""
    top = (exc.name or "").split(".")[0]
    extra = MODULE_EXTRA.get(top)
    return None if extra is None else MissingExtraError(feature, extra, top)
