"""networks/weights.py: the one .h5 topology check (order-matched, names free) and JSON attributes."""
import h5py
import numpy as np
import pytest
import tensorflow as tf

from contrareg_tf.errors import ContraRegInputError
from contrareg_tf.networks import weights as W


def _mlp(widths, prefix):
    x = tf.keras.Input((3,))
    y = x
    for k, w in enumerate(widths):
        y = tf.keras.layers.Dense(w, name=f"{prefix}{k}")(y)
    return tf.keras.Model(x, y)


def test_same_topology_other_names_loads_and_equals(tmp_path):
    a, b = _mlp((4, 2), "a"), _mlp((4, 2), "b")
    p = str(tmp_path / "a.h5")
    a.save_weights(p)
    assert [n for n, _ in W.file_layers(p)] == ["a0", "a1"]
    W.load_weights(b, p)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_mismatches_name_the_file_and_the_first_difference(tmp_path):
    p = str(tmp_path / "a.h5")
    _mlp((4, 2), "a").save_weights(p)
    with pytest.raises(ContraRegInputError, match=r"a\.h5: wrong topology: layer 1 'c1' \(file layer 'a1'\): "
                                                  r"weight 'kernel:0' expected shape \(4, 3\), found \(4, 2\)"):
        W.check_weights_file(_mlp((4, 3), "c"), p)
    with pytest.raises(ContraRegInputError, match="file has 2 layers with weights, model .* has 3"):
        W.check_weights_file(_mlp((4, 2, 5), "d"), p)
    (tmp_path / "junk.h5").write_text("x")
    with pytest.raises(ContraRegInputError, match=r"junk\.h5: not an HDF5 weights file"):
        W.file_layers(tmp_path / "junk.h5")
    with pytest.raises(ContraRegInputError, match="not found"):
        W.file_layers(tmp_path / "none.h5")
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(ContraRegInputError, match="no 'layer_names'"):
        W.file_layers(tmp_path / "empty.h5")


def test_json_attribute_round_trip(tmp_path):
    p = str(tmp_path / "a.h5")
    _mlp((2,), "a").save_weights(p)
    assert W.read_json_attr(p, "cfg") is None
    W.write_json_attr(p, "cfg", {"ndim": 3, "widths": [8, 16]})
    assert W.read_json_attr(p, "cfg") == {"ndim": 3, "widths": [8, 16]}
