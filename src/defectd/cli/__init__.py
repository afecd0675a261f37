"""Entry point of the ``defectd`` command: errors become one line and a non-zero exit."""

from __future__ import annotations

import sys

from defectd.cli.app import Injected, app
from defectd.errors import DefectdError

# Subcommands register themselves on ``app`` when imported.
from defectd.cli import synth_cmd  # noqa: F401  # isort: skip
from defectd.cli import calibrate_cmd  # noqa: F401  # isort: skip
from defectd.cli import calibrate_threshold_cmd  # noqa: F401  # isort: skip
from defectd.cli import calibrate_int8_cmd  # noqa: F401  # isort: skip
from defectd.cli import train_cmd  # noqa: F401  # isort: skip
from defectd.cli import eval_cmd  # noqa: F401  # isort: skip
from defectd.cli import export_cmd  # noqa: F401  # isort: skip
from defectd.cli import cameras_cmd  # noqa: F401  # isort: skip
from defectd.cli import run_cmd  # noqa: F401  # isort: skip
from defectd.cli import config_cmd  # noqa: F401  # isort: skip
from defectd.cli import demo_cmd  # noqa: F401  # isort: skip
from defectd.cli import engine_cmd  # noqa: F401  # isort: skip
from defectd.cli import watch_cmd  # noqa: F401  # isort: skip
from defectd.cli import dataset_cmd  # noqa: F401  # isort: skip
from defectd.cli import card_cmd  # noqa: F401  # isort: skip
from defectd.cli import opcua_cmd  # noqa: F401  # isort: skip
from defectd.cli import plc_sim_cmd  # noqa: F401  # isort: skip

EXIT_ERROR = 2


def main(argv: list[str] | None = None, *, injected: Injected | None = None) -> int:
    """Run the CLI; a ``DefectdError`` prints ``error: <message>`` and exits 2.

    Usage errors are reported by the CLI library itself (also exit 2). ``injected`` hands the
    commands replacements for real parts (tests: an engine opener); None in production.
    """
    try:
        app(args=argv, prog_name="defectd", obj=injected or Injected())
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except DefectdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
