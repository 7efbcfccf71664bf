"""Stack shims for voxelmorph 0.2 + neurite 0.2 on Python 3.11 + TF 2.15 and Python 3.12 / 3.13 + TF 2.21.

Imported first by ``contrareg_tf/__init__.py`` (and by ``tests/conftest.py``) so that every patch is in
place before neurite / voxelmorph are imported anywhere. Each patch is small, idempotent and has a test
in ``tests/test_compat.py``.

Patches
-------
0. Keras 2 as ``tf.keras``: voxelmorph / neurite 0.2 are Keras-2 code, and TF >= 2.16 makes Keras 3 the default
   ``tf.keras``. ``TF_USE_LEGACY_KERAS=1`` routes ``tf.keras`` to the ``tf-keras`` package instead, but TF reads
   it when it is first imported — so it is set here, before anything imports TF, whenever ``tf-keras`` is
   installed. Not without it: TF 2.15 honours the variable too and then fails to import Keras at all (its own
   Keras 2 is the default there). :func:`check_keras` (run by :func:`apply`) fails with one ``ImportError``
   when TF >= 2.16 has no ``tf-keras``, or was imported earlier with Keras 3 as ``tf.keras``.
1. ``inspect.getargspec`` was removed in Python 3.11; ``neurite/tf/modelio.py`` calls it when a model
   class is decorated with ``store_config_args``. We alias it to ``getfullargspec(...)[:4]`` (the same
   ``ArgSpec(args, varargs, keywords, defaults)`` tuple the old function returned).
2. ``neurite.tf.losses.MutualInformation.__init__`` prints a tensor (a leftover debug print); we silence
   stdout while it runs.
3. Log noise: ``TF_CPP_MIN_LOG_LEVEL=3`` (TF 2.15 prints three "Unable to register cuDNN/cuFFT/cuBLAS factory"
   lines at ERROR level on every start) unless the user set it, and
   tensorflow-addons' end-of-life warning is filtered. TF 2.21 logs its start-up lines (oneDNN notice, CUDA stub)
   through absl before it applies ``TF_CPP_MIN_LOG_LEVEL``; :func:`_import_tensorflow` drops the lines below
   that level while TF loads (the one-``error:``-line contract of the commands).
"""
import contextlib
import importlib
import importlib.util
import inspect
import io
import os
import re
import sys
import tempfile
import warnings
from collections import namedtuple

# patch 0: read by TF at its first import; forced, not defaulted, where tf-keras exists (Keras 3 cannot run
# neurite 0.2)
_TF_PREIMPORTED = "tensorflow" in sys.modules
_HAVE_TF_KERAS = importlib.util.find_spec("tf_keras") is not None
if _HAVE_TF_KERAS:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
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
    # lazy: neurite loads TensorFlow, which must follow TF_USE_LEGACY_KERAS (patch 0) and check_keras
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


class KerasVersionError(ImportError):
    """TensorFlow's ``tf.keras`` is not Keras 2 (see patch 0)."""


def _tf_minor(version):
    major, minor = (int(p) for p in version.split(".")[:2])
    return major, minor


_NATIVE_LOG = re.compile(r"^([IWEF])\d{4} ")       # absl / TF C++ log line: severity letter, MMDD
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


@contextlib.contextmanager
def native_log_filter():
    """Drop the native (absl / TF C++) log lines below ``TF_CPP_MIN_LOG_LEVEL`` written to file descriptor 2 while
    the block runs (patch 3): it goes to a temporary file; every other line is written back. Used around TF's
    import and around the first XLA compilation of a function, whose "Compiled cluster using XLA" line absl
    prints whatever the level."""
    level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") or 0)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
            keep = [ln for ln in lines if not (ln.strip() == _ABSL_BANNER or (
                _NATIVE_LOG.match(ln) and "IWEF".index(ln[0]) < level))]
            sys.stderr.write("".join(keep))
            sys.stderr.flush()


def _import_tensorflow():
    """``import tensorflow`` with the native start-up lines below ``TF_CPP_MIN_LOG_LEVEL`` dropped (patch 3)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with native_log_filter():
        import tensorflow as tf  # lazy: after TF_USE_LEGACY_KERAS is set (patch 0), its start-up lines filtered
    return tf


def check_keras():
    """Raise :class:`KerasVersionError` unless ``tf.keras`` is Keras 2 (patch 0); imports TensorFlow."""
    tf = _import_tensorflow()

    version = _tf_minor(tf.__version__)
    if version < (2, 16):
        return                                           # Keras 2 is tf.keras's only implementation here
    pin = f"{version[0]}.{version[1]}.*"
    if not _HAVE_TF_KERAS:
        raise KerasVersionError(f"TensorFlow {tf.__version__} needs the tf-keras package for Keras 2 as tf.keras "
                                f"(voxelmorph / neurite 0.2): pip install 'tf-keras=={pin}'")
    # TF records what it read at import; a TF imported without the variable routes `tensorflow.keras.*`
    # imports to Keras 3 even if tf.keras itself has not been touched yet
    if not getattr(tf, "_tf_uses_legacy_keras", not _TF_PREIMPORTED):
        raise KerasVersionError(
            f"TensorFlow {tf.__version__} was imported before contrareg_tf with Keras 3 as tf.keras; voxelmorph / "
            "neurite 0.2 need Keras 2: import contrareg_tf before tensorflow, or set TF_USE_LEGACY_KERAS=1 in "
            "the environment")
    package = tf.keras.Model.__module__.split(".")[0]          # tf_keras (Keras 2) or keras (Keras 3)
    if package != "tf_keras":
        raise KerasVersionError(f"tf.keras is {package} {importlib.import_module(package).__version__}; voxelmorph"
                                f" / neurite 0.2 need Keras 2 (pip install 'tf-keras=={pin}', "
                                "TF_USE_LEGACY_KERAS=1)")


def deterministic_ops(seed):
    """The train / eval / reproduce commands' reproducibility switch: where TF sees a GPU, seed Python, numpy and
    TF (op determinism refuses unseeded random ops, e.g. Keras' unseeded initialisers) and turn on TF's
    deterministic ops; on a CPU-only machine, nothing.

    Why GPU only (measured in issue 26, TF 2.15 CPU): tiny2d MI / CR and cpu-demo mCR training already give
    bit-identical weights run to run without it, and with it the very same bits — the CPU kernels are
    deterministic for a fixed thread count — while it costs step time (0-20 % on a cpu-demo step, measured on a
    shared machine). On a GPU, cuDNN's algorithm choice and atomic reductions (scatter / segment sums in the
    warps' backward pass) differ run to run unless it is on. Process-wide. Returns whether it was turned on."""
    tf = _import_tensorflow()

    if not tf.config.list_physical_devices("GPU"):
        return False
    tf.keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()
    return True


def apply():
    """Check Keras, then apply the patches that need neurite/voxelmorph imported (idempotent)."""
    check_keras()
    _patch_neurite_mi_print()


PATCHES = ("TF_USE_LEGACY_KERAS", "inspect.getargspec", "neurite MutualInformation print", "log noise")
