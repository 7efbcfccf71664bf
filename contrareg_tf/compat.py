"""Stack shims for Python 3.11 + TF 2.15 + voxelmorph 0.2 + neurite 0.2.

Imported first by ``contrareg_tf/__init__.py`` (and by ``tests/conftest.py``) so that every patch is in
place before neurite / voxelmorph are imported anywhere. Each patch is small, idempotent and has a test
in ``tests/test_compat.py``.

Patches
-------
1. ``inspect.getargspec`` was removed in Python 3.11; ``neurite/tf/modelio.py`` calls it when a model
   class is decorated with ``store_config_args``. We alias it to ``getfullargspec(...)[:4]`` (the same
   ``ArgSpec(args, varargs, keywords, defaults)`` tuple the old function returned).
2. ``neurite.tf.losses.MutualInformation.__init__`` prints a tensor (a leftover debug print); we silence
   stdout while it runs.
3. Log noise: ``TF_CPP_MIN_LOG_LEVEL=3`` (TF 2.15 prints three "Unable to register cuDNN/cuFFT/cuBLAS factory"
   lines at ERROR level on every start) unless the user set it, and
   tensorflow-addons' end-of-life warning is filtered.
"""
import contextlib
import inspect
import io
import os
import warnings
from collections import namedtuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", message=r".*TensorFlow Addons.*")
warnings.filterwarnings("ignore", module=r"tensorflow_addons.*")

ArgSpec = namedtuple("ArgSpec", ["args", "varargs", "keywords", "defaults"])


def _getargspec(func):
    """Python < 3.11 ``inspect.getargspec`` re-created from ``getfullargspec``."""
    spec = inspect.getfullargspec(func)
    return ArgSpec(spec.args, spec.varargs, spec.varkw, spec.defaults)


if not hasattr(inspect, "getargspec"):
    inspect.getargspec = _getargspec


def _patch_neurite_mi_print():
    import neurite as ne

    cls = ne.losses.MutualInformation
    if getattr(cls.__init__, "_contrareg_quiet", False):
        return
    orig = cls.__init__

    def __init__(self, *args, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()):
            orig(self, *args, **kwargs)

    __init__._contrareg_quiet = True
    cls.__init__ = __init__


def apply():
    """Apply the patches that need neurite/voxelmorph imported (idempotent)."""
    _patch_neurite_mi_print()


PATCHES = ("inspect.getargspec", "neurite MutualInformation print", "log noise")
