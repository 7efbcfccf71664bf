"""contrareg_tf — ContraReg (MICCAI 2022) in TensorFlow 2 / Keras, with MIND / DNS descriptors and
instance optimisation. ``compat`` is imported first: it patches the stack before neurite/voxelmorph load.
"""
from . import compat  # noqa: F401  (must stay first)

compat.apply()
from .config import PAPER, PRESETS, LAMBDAS_17, Config, get_preset  # noqa: F401
from .errors import ContraRegInputError  # noqa: F401

__version__ = "0.1.0"
