"""The supported stacks (issue 26): Keras 2 as tf.keras on TF 2.15 and TF >= 2.16 (tf-keras), autoencoder .h5
files written with tensorflow-addons' InstanceNormalization loading without tfa, bit-identical re-runs, and the
commands' determinism switch.

``tests/data/ae_tfa_2d.h5`` (+ ``ae_tfa_2d_expected.npz``: a fixed input and the tfa model's outputs) was written
once with tfa 0.23 / TF 2.15 on Python 3.11 by ``python tests/test_stack.py --write-fixture``; the tests read it
on stacks without tfa, and rebuild it with tfa where tfa is installed.
"""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from contrareg_tf import compat
from contrareg_tf.networks import autoencoder as ae

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "data", "ae_tfa_2d.h5")
EXPECTED = os.path.join(HERE, "data", "ae_tfa_2d_expected.npz")
FIXTURE_FILTERS = (4, 8, 8, 8, 4, 4, 4, 1)      # the paper's 7 blocks + output, narrow: a file of a few KB
TF_VERSION = tuple(int(p) for p in tf.__version__.split(".")[:2])


def _tfa_autoencoder(filters=FIXTURE_FILTERS, seed=26):
    """A 2-D autoencoder of the package topology built with tfa's InstanceNormalization and Keras' default layer
    names (as an outside tfa user would write it), weights drawn from ``seed`` (non-trivial norms included)."""
    import tensorflow_addons as tfa

    L = tf.keras.layers
    x = inp = tf.keras.Input((None, None, 1))
    feats = []
    for i, f in enumerate(filters[:-1]):
        if 3 <= i < 6:
            x = L.UpSampling2D(2)(x)
        x = L.Conv2D(f, 3, strides=2 if i < 3 else 1, padding="same")(x)
        feats.append(x)
        x = L.LeakyReLU(0.2)(tfa.layers.InstanceNormalization()(x))
    model = tf.keras.Model(inp, [L.Conv2D(filters[-1], 3, padding="same")(x)] + feats[:6])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def _fixture_input():
    return np.random.default_rng(0).random((1, 16, 16, 1)).astype(np.float32)


def write_fixture():
    model = _tfa_autoencoder()
    model.save_weights(FIXTURE)
    x = _fixture_input()
    np.savez_compressed(EXPECTED, x=x, **{f"out{i}": o.numpy() for i, o in enumerate(model(x))})


# ------------------------------------------------------------------------------------------------ Keras
def test_import_routes_tf_keras_to_keras2():
    import importlib.util

    has_tf_keras = importlib.util.find_spec("tf_keras") is not None
    assert (os.environ.get("TF_USE_LEGACY_KERAS") == "1") == has_tf_keras
    package = tf.keras.Model.__module__.split(".")[0]
    assert package == ("tf_keras" if TF_VERSION >= (2, 16) else "keras")
    if package == "keras":
        import keras
        assert keras.__version__.startswith("2.")


@pytest.mark.skipif(TF_VERSION < (2, 16), reason="TF 2.15's tf.keras is always Keras 2")
def test_tensorflow_imported_first_with_keras3_is_one_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    r = subprocess.run([sys.executable, "-c", "import tensorflow; import contrareg_tf"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("contrareg_tf.compat.KerasVersionError:") and "import contrareg_tf before" in last
    # with the variable set by the user, importing TF first is fine
    r = subprocess.run([sys.executable, "-c", "import tensorflow; import contrareg_tf"],
                       env={**env, "TF_USE_LEGACY_KERAS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_import_is_quiet_at_log_level_3():
    """TF 2.21 writes its start-up lines through absl before it reads TF_CPP_MIN_LOG_LEVEL; the package drops them
    while TF loads (the commands' one-error-line contract) and lets everything else through."""
    code = "import sys; import contrareg_tf; print('after', file=sys.stderr)"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr.strip().splitlines() == ["after"], r.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ tfa .h5
_LOAD_WITHOUT_TFA = """
import sys
sys.modules["tensorflow_addons"] = None          # any `import tensorflow_addons` raises ImportError
import numpy as np
from contrareg_tf.networks import autoencoder as ae
model = ae.load_autoencoder(sys.argv[1], 2, filters={filters})
ref = np.load(sys.argv[2])
for i, o in enumerate(model(ref["x"])):
    np.testing.assert_allclose(o.numpy(), ref[f"out{{i}}"], rtol=1e-4, atol=1e-5)
assert not any(m.startswith("tensorflow_addons") for m in sys.modules if sys.modules[m] is not None)
print("loaded without tfa")
"""


def test_tfa_fixture_loads_without_tfa():
    """The committed tfa-written file loads into the package's GroupNormalization autoencoder, tfa blocked, and
    reproduces the tfa model's outputs (so the instance norm reads tfa's gamma / beta in the right order)."""
    r = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_TFA.format(filters=FIXTURE_FILTERS), FIXTURE,
                        EXPECTED], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "loaded without tfa" in r.stdout, r.stderr[-3000:]


def test_tfa_fixture_is_what_tfa_writes(tmp_path):
    """Where tfa installs: a file written by tfa now loads the same way, and matches the committed fixture."""
    pytest.importorskip("tensorflow_addons")
    model = _tfa_autoencoder()
    path = str(tmp_path / "tfa.h5")
    model.save_weights(path)
    ours = ae.load_autoencoder(path, 2, filters=FIXTURE_FILTERS)
    ref = np.load(EXPECTED)
    for o, t in zip(ours(ref["x"]), model(ref["x"])):
        np.testing.assert_allclose(o.numpy(), t.numpy(), rtol=1e-4, atol=1e-5)
    fixture = ae.load_autoencoder(FIXTURE, 2, filters=FIXTURE_FILTERS)
    for a, b in zip(fixture.get_weights(), ours.get_weights()):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ determinism
def _blobs(n, shape, seed):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    t1 = np.stack([gaussian_filter(rng.random(shape), 2.0) for _ in range(n)])
    t1 = ((t1 - t1.min()) / (t1.max() - t1.min())).astype(np.float32)
    return {"t1": t1, "t2": 1.0 - t1}


def _weights_hash(run):
    import h5py

    h = hashlib.sha256()
    with h5py.File(os.path.join(run, "model.h5"), "r") as f:
        f.visititems(lambda n, o: h.update(n.encode() + np.asarray(o).tobytes())
                     if isinstance(o, h5py.Dataset) else None)
    return h.hexdigest()


@pytest.mark.parametrize("loss", ["mi", "cr"])
def test_same_seed_twice_gives_bit_identical_weights(tmp_path, loss):
    """Two tiny2d runs with one seed: the same weights to the bit (CR: random AEs and PatchNCE locations too)."""
    from contrareg_tf import training
    from contrareg_tf.config import get_preset

    cfg = get_preset("tiny2d")
    arrays = _blobs(4, cfg.inshape, 0)
    runs = [str(tmp_path / f"run{i}") for i in range(3)]
    for run in runs[:2]:
        training.train_hyper(cfg, loss, run, arrays, iters=3, rand_ae=True, progress=False)
    assert _weights_hash(runs[0]) == _weights_hash(runs[1])
    # ... and a hash that can differ: the weights moved during training
    training.train_hyper(cfg, loss, runs[2], arrays, iters=0, rand_ae=True, progress=False)
    assert _weights_hash(runs[2]) != _weights_hash(runs[0])


def test_deterministic_ops_only_with_a_gpu(monkeypatch):
    """The commands' switch: seeds + op determinism where TF sees a GPU; on the CPU nothing (runs are
    bit-identical without it there, measured in issue 26, so the CPU numbers stay exactly as they were)."""
    calls = []
    monkeypatch.setattr(tf.config.experimental, "enable_op_determinism", lambda: calls.append("det"))
    monkeypatch.setattr(tf.keras.utils, "set_random_seed", lambda s: calls.append(("seed", s)))
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert compat.deterministic_ops(7) is False and calls == []
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")])
    assert compat.deterministic_ops(3) is True and calls == [("seed", 3), "det"]


if __name__ == "__main__" and sys.argv[1:] == ["--write-fixture"]:
    write_fixture()
