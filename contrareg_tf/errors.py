"""Exception and warning types of the package, and the command-line contract they map to.

* :class:`ContraRegInputError` — bad input; scripts print one ``error: …`` line on stderr, exit status 2.
* :class:`RegistrationDiverged` — a registration (instance optimisation) produced NaN/Inf: also exit 2,
  since the cause is a user-chosen setting (too high a learning rate, too low a regularisation weight).
  It is a ``FloatingPointError`` too, for callers that caught the earlier bare ``FloatingPointError``.
* :class:`TrainingDiverged` — a training run's loss became NaN/Inf (the last good checkpoint is kept): exit 3.
* :class:`ContraRegWarning` — a result was written but may be wrong (e.g. > 20 % folding voxels, images that
  look mis-aligned with ``--affine none``); scripts print it as one ``warning: …`` line on stderr.
"""


class ContraRegInputError(ValueError):
    """Bad input: missing/non-NIfTI file, wrong dimensionality, shape mismatch, NaN/Inf, empty mask,
    λ outside [0, 1], weights of the wrong topology. The message names the file/argument and the problem."""


class RegistrationDiverged(ContraRegInputError, FloatingPointError):
    """A registration's displacement became NaN/Inf; the message names the likely cause."""


class TrainingDiverged(RuntimeError):
    """A NaN/Inf loss stopped a training run; the last good checkpoint is kept on disk (scripts exit 3)."""


class ContraRegWarning(UserWarning):
    """A written result that may be wrong; the message says why and what to try."""
