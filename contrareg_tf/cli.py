"""Shared command-line plumbing for the thin scripts in ``train_scripts/`` and ``eval_scripts/``.

Contract: bad input (``ContraRegInputError``, including ``RegistrationDiverged``) and missing files are one
``error: …`` line on stderr and exit status 2; a diverged training run is one ``error: …`` line and exit 3;
``ContraRegWarning`` is one ``warning: …`` line on stderr and does not change the exit status.
"""
import sys
import warnings

from .errors import ContraRegInputError, ContraRegWarning, TrainingDiverged


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, ContraRegWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def run_cli(main, argv=None):
    """Run ``main(argv)``; bad input (``ContraRegInputError``) and missing files become one line on
    stderr and exit status 2 instead of a traceback; ``ContraRegWarning`` becomes one ``warning:`` line."""
    warnings.showwarning = _show_warning
    warnings.simplefilter("always", ContraRegWarning)
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
    finally:
        warnings.showwarning = _default_showwarning
    sys.exit(rc or 0)
