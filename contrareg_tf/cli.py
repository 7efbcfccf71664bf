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


def console(main):
    """The console entry point (``setup.py``) of a command module: ``cli = console(main)``."""
    def cli(argv=None):
        run_cli(main, argv)

    cli.__doc__ = f"Run ``{main.__module__}.main`` as a console command (one-line errors, exit status 2)."
    return cli


def add_pair_outputs(p):
    """Options both registration commands share: labels in and out, affine pre-alignment, the ITK export."""
    p.add_argument("--moving-labels", help="label map of the moving image")
    p.add_argument("--moved-labels", help="output: moving labels warped (nearest neighbour)")
    p.add_argument("--affine", default="none", choices=("none", "ants"),
                   help="affine pre-alignment: 'ants' = ANTs affine, mutual information (antspyx), composed with "
                   "the deformable warp in every output; 'none' warns when the pair looks mis-aligned")
    p.add_argument("--itk-warp", help="output: the warp as an ITK/ANTs displacement field (LPS mm; "
                   "antsApplyTransforms -t / ants.apply_transforms accept it)")
