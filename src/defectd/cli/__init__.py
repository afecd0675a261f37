"""Entry point of the ``defectd`` command: errors become one line and a non-zero exit."""

from __future__ import annotations

import sys

from defectd.cli.app import Injected, app
from defectd.errors import DefectdError
from defectd.extras import missing_extra_error
from defectd.log import get_logger

# Subcommands register themselves on ``app`` when imported.
from defectd.cli import synth_cmd  # noqa: F401  # isort: skip
from defectd.cli import calibrate_cmd  # noqa: F401  # isort: skip
from defectd.cli import calibrate_threshold_cmd  # noqa: F401  # isort: skip
from defectd.cli import calibrate_int8_cmd  # noqa: F401  # isort: skip
from defectd.cli import train_cmd  # noqa: F401  # isort: skip
from defectd.cli import eval_cmd  # noqa: F401  # isort: skip
from defectd.cli import compare_cmd  # noqa: F401  # isort: skip
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
from defectd.cli import audit_cmd  # noqa: F401  # isort: skip
from defectd.cli import promote_cmd  # noqa: F401  # isort: skip
from defectd.cli import shadow_cmd  # noqa: F401  # isort: skip

EXIT_ERROR = 2


def main(argv: list[str] | None = None, *, injected: Injected | None = None) -> int:
    """Run the CLI; a ``DefectdError`` prints ``error: <message>`` and exits 2.

    Usage errors are reported by the CLI library itself (also exit 2). A module of a pip extra
    that is not installed (torch on a station install) is the same one line, naming the extra.
    ``injected`` hands the commands replacements for real parts (tests: an engine opener);
    None in production.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        app(args=args, prog_name="defectd", obj=injected or Injected())
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except DefectdError as exc:
        _fatal(args, "error", f"error: {exc}", error=str(exc), exit_code=EXIT_ERROR)
        return EXIT_ERROR
    except ModuleNotFoundError as exc:
        # Commands check their extra before they start (defectd.extras.require_extra); this
        # catches an import of an extra's module on a path that did not.
        missing = missing_extra_error(exc, "this command")
        if missing is None:
            raise
        _fatal(args, "error", f"error: {missing}", error=str(missing), exit_code=EXIT_ERROR)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _fatal(args, "interrupted", "interrupted", exit_code=130)
        return 130
    return 0


def _json_logs(args: list[str]) -> bool:
    """Whether ``--log-format json`` was given (before the subcommand)."""
    for i, arg in enumerate(args):
        if arg == "--log-format":
            return i + 1 < len(args) and args[i + 1] == "json"
        if arg == "--log-format=json":
            return True
        if not arg.startswith("-"):
            return False  # the subcommand: global options come before it
    return False


def _fatal(args: list[str], event: str, line: str, **fields: object) -> None:
    """The last words of a failed command: ``line`` on stderr, or with ``--log-format json`` one
    JSON log event (so a JSON log stays JSON to its end)."""
    if _json_logs(args):
        get_logger("defectd.cli").error(event, **fields)
    else:
        print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
