"""One test per compat patch (contrareg_tf/compat.py)."""
import contextlib
import inspect
import io

import contrareg_tf
from contrareg_tf import compat


def _f(a, b=2, *args, **kw):
    return a


def test_getargspec_alias_matches_fullargspec():
    spec = inspect.getargspec(_f)
    assert spec.args == ["a", "b"]
    assert spec.varargs == "args" and spec.keywords == "kw" and spec.defaults == (2,)


def test_neurite_and_voxelmorph_import_and_store_config_args():
    import neurite as ne
    import voxelmorph as vxm

    # store_config_args is the decorator that called inspect.getargspec on py3.11
    model = vxm.networks.VxmDense((16, 16), nb_unet_features=[[4, 4], [4, 4, 4]], int_steps=2)
    assert model.config.params["inshape"] == (16, 16)
    assert isinstance(model, ne.modelio.LoadableModel)


def test_neurite_mi_constructor_is_quiet():
    import neurite as ne

    compat.apply()
    compat.apply()  # idempotent
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ne.losses.MutualInformation(nb_bins=8)
    assert buf.getvalue() == ""


def test_log_level_default_set():
    import os

    assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") is not None
    assert contrareg_tf.__version__
