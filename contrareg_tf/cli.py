"""Shared command-line plumbing for the thin scripts in ``train_scripts/`` and ``eval_scripts/``."""
import sys

from .errors import ContraRegInputError, TrainingDiverged


def run_cli(main, argv=None):
    """Run ``main(argv)``; bad input (``ContraRegInputError``) and missing files become one line on
    stderr and exit status 2 instead of a traceback."""
    try:
        rc = main(argv)
    except (ContraRegInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc or 0)
