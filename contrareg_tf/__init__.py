"""contrareg_tf — ContraReg (MICCAI 2022) in TensorFlow 2 / Keras, with MIND / DNS descriptors and
instance optimisation. ``compat`` is imported first: it patches the stack before neurite/voxelmorph load.
"""
import os as _os
import sys as _sys

_QUIET_COMMANDS = ("contrareg-register", "contrareg-instance-opt")  # one-line error contract: TF's C++ start-up
if _sys.argv and _os.path.basename(_sys.argv[0]) in _QUIET_COMMANDS:  # lines would precede it
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from . import compat  # noqa: E402,F401  (must stay first)

compat.apply()
from .config import PAPER, PRESETS, LAMBDAS_17, Config, get_preset  # noqa: F401
from .errors import ContraRegInputError  # noqa: F401

__version__ = "0.1.0"
