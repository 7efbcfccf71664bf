"""Shared command-line plumbing for the thin scripts in ``train_scripts/`` and ``eval_scripts/``.

Contract: bad input (``ContraRegInputError``, including ``RegistrationDiverged``) and missing files are one
``error: …`` line on stderr and exit status 2; a diverged training run is one ``error: …`` line and exit 3;
``ContraRegWarning`` is one ``warning: …`` line on stderr and does not change the exit status.
"""
import argparse
import errno
import math
import sys
import warnings

from .errors import ContraRegInputError, ContraRegWarning, TrainingDiverged


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        # a full disk or a read-only / forbidden folder found while writing: the writers are atomic, so nothing
        # partial was left; one line instead of a traceback
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror}", file=sys.stderr)
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


def console(main):
    """The console entry point (``setup.py``) of a command module: ``cli = console(main)``."""
    def cli(argv=None):
        run_cli(main, argv)

    cli.__doc__ = f"Run ``{main.__module__}.main`` as a console command (one-line errors, exit status 2)."
    return cli


def _number(kind, low, low_ok, high=None):
    """An argparse ``type`` for a finite number of ``kind`` (int / float) above ``low`` (or equal when
    ``low_ok``) and at most ``high``: a value out of range is argparse's one-line usage error (exit 2)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(v) or v < low or (v == low and not low_ok) or (high is not None and v > high):
            rng = f"{'≥' if low_ok else '>'} {low}" + (f" and ≤ {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{text!r}: must be {rng}")
        return v

    parse.__name__ = kind.__name__     # argparse names the type in its message
    return parse


positive_int = _number(int, 1, True)
nonnegative_int = _number(int, 0, True)
positive_float = _number(float, 0.0, False)
unit_float = _number(float, 0.0, True, 1.0)          # λ
percent = _number(float, 0.0, True, 100.0)            # fold budgets


def positive_ints(text):
    """A comma-separated grid or crop, e.g. ``96,112,96``: positive integers."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated sizes, e.g. 96,112,96")
    return tuple(positive_int(t) for t in parts)


# scaling-and-squaring steps: 0 (no integration) to 64 (2^64 sub-steps is already far past float32)
int_steps = _number(int, 0, True, 64)


def add_grid_options(p, inshape=True):
    """``--inshape`` / ``--spacing`` of a command that reads ``--data`` (``data.grid.grid_config`` applies them)."""
    if inshape:
        p.add_argument("--inshape", type=positive_int, nargs="+", metavar="N",
                       help="model grid of --data (default: the preset's); scans are centre-cropped / padded to it "
                       "unless --spacing is given")
    p.add_argument("--spacing", type=positive_float, metavar="MM",
                   help="resample --data in physical space to this voxel size (mm)" + (" on the --inshape grid"
                   if inshape else "") + ", centred on each subject's brain (default: keep the files' voxels)")


def add_pair_outputs(p):
    """Options both registration commands share: labels in and out, affine pre-alignment, the ITK export."""
    p.add_argument("--moving-labels", help="label map of the moving image")
    p.add_argument("--moved-labels", help="output: moving labels warped (nearest neighbour)")
    p.add_argument("--affine", default="none", choices=("none", "ants"),
                   help="affine pre-alignment: 'ants' = ANTs affine, mutual information (antspyx), composed with "
                   "the deformable warp in every output; 'none' warns when the pair looks mis-aligned")
    p.add_argument("--itk-warp", help="output: the warp as an ITK/ANTs displacement field (LPS mm; "
                   "antsApplyTransforms -t / ants.apply_transforms accept it)")
