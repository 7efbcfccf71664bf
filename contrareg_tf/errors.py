"""The one exception type raised for bad user input (scripts turn it into a one-line error, exit 2)."""


class ContraRegInputError(ValueError):
    """Bad input: missing/non-NIfTI file, wrong dimensionality, shape mismatch, NaN/Inf, empty mask,
    λ outside [0, 1], weights of the wrong topology. The message names the file/argument and the problem."""


class TrainingDiverged(RuntimeError):
    """A NaN/Inf loss stopped a training run; the last good checkpoint is kept on disk (scripts exit 3)."""
