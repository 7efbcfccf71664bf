"""The README snippet (a voxelmorph user's lines) runs as written and trains the network and the heads."""
import os
import re

import numpy as np
import pytest
import tensorflow as tf

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
KL = tf.keras.layers


def snippet_code():
    """The python block of README.md that uses ``attach_heads`` (the voxelmorph drop-in), exactly as written."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", open(README).read(), re.S) if "attach_heads" in b]
    assert blocks, "README.md lost its voxelmorph drop-in snippet"
    return blocks[0]


def tiny_ae(seed):
    tf.keras.utils.set_random_seed(seed)
    x = KL.Input((32, 32, 1))
    f1 = KL.Conv2D(4, 3, padding="same", activation="relu")(x)
    f2 = KL.Conv2D(6, 3, strides=2, padding="same", activation="relu")(f1)
    return tf.keras.Model(x, [KL.Conv2D(1, 1)(f1), f1, f2])


def tiny_heads(seed):
    tf.keras.utils.set_random_seed(seed)
    return [tf.keras.Sequential([KL.Input((c,)), KL.Dense(8, activation="relu"), KL.Dense(8),
                                 KL.UnitNormalization()]) for c in (4, 6)]


@pytest.mark.slow  # ~60-100 s on 2 shared cores: tracing vxm's fit graph (VecInt) dominates
def test_readme_snippet_trains_registration_and_heads(tmp_path, monkeypatch):
    import voxelmorph as vxm

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    blob = lambda cy, cx, r: (((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2).astype(np.float32)
    fixed = np.stack([blob(16, 16, 9) * 0.8 + blob(14, 15, 4) * 0.2, blob(15, 17, 10) * 0.9])[..., None]
    moving = np.stack([1 - blob(17, 15, 9) * 0.7, 1 - blob(16, 16, 9) * 0.6])[..., None] * blob(16, 16, 13)[
        None, ..., None]
    moving = np.clip(moving + 0.01 * rng.random(moving.shape), 0, 1).astype(np.float32)
    A1, A2, F1, F2 = tiny_ae(1), tiny_ae(2), tiny_heads(3), tiny_heads(4)
    ns = dict(np=np, A1=A1, A2=A2, F1=F1, F2=F2, moving=moving, fixed=fixed, inshape=(32, 32))
    ae_before = [w.copy() for w in A1.get_weights() + A2.get_weights()]
    heads_before = [v.numpy().copy() for h in F1 + F2 for v in h.trainable_variables]

    VxmDense, built = vxm.networks.VxmDense, []

    def recording_vxm_dense(*args, **kwargs):  # records the initial registration weights
        m = VxmDense(*args, **kwargs)
        built.append([w.copy() for w in m.get_weights()])
        return m

    monkeypatch.setattr(vxm.networks, "VxmDense", recording_vxm_dense)
    code = snippet_code()
    exec(compile(code, "patchnce_readme_snippet", "exec"), ns)   # exactly the snippet's lines

    model, trainer, hist = ns["model"], ns["trainer"], ns["hist"]
    assert len(hist.history["loss"]) == 1 and np.isfinite(hist.history["loss"][0])
    assert hist.history["loss"][0] > 0
    # registration weights changed: every trainable variable of the plain vxm model moved
    changed = [np.any(a != b) for a, b in zip(built[0], model.get_weights())]
    assert len(built) == 1 and all(changed)
    loaded = VxmDense.load(str(tmp_path / "vxm_mcr.h5"))  # saved model is a plain VxmDense
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), model.get_weights()))
    # heads trained, autoencoders untouched
    heads_after = [v.numpy() for h in F1 + F2 for v in h.trainable_variables]
    assert all(np.any(a != b) for a, b in zip(heads_before, heads_after))
    assert all(np.array_equal(a, b) for a, b in zip(ae_before, A1.get_weights() + A2.get_weights()))
    assert "attach_heads(model, d12, d21)" in code and "d12.loss, d21.loss" in code
