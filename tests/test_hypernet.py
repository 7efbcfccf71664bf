"""The hypernetwork's activation (networks/hyper.py ``_hypernet``; ``Config.hyp_activation``)."""
import dataclasses
import json

import numpy as np
import pytest

from contrareg_tf import ContraRegInputError
from contrareg_tf.config import get_preset
from contrareg_tf.networks.hyper import _hypernet, build_hyper_vxm
from contrareg_tf.runs import _differences, _with_field_defaults


def _numpy_mlp(weights, lam, slope):
    h = np.asarray(lam, np.float64)[:, None]
    for k, b in zip(weights[::2], weights[1::2]):
        z = h @ k + b
        h = np.where(z > 0, z, slope * z)
    return h


@pytest.mark.parametrize("activation, slope", [("relu", 0.0), ("leaky_relu", 0.2)])
def test_hypernet_matches_numpy(activation, slope):
    net = _hypernet(3, 8, "t", activation)
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=w.shape).astype(np.float32) for w in net.get_weights()]
    net.set_weights(weights)
    lam = np.linspace(0, 1, 11, dtype=np.float32)
    np.testing.assert_allclose(net(lam[:, None]).numpy(), _numpy_mlp(weights, lam, slope), rtol=1e-5, atol=1e-5)


def test_relu_units_with_negative_weights_are_dead_and_leaky_ones_are_not():
    """Zero biases and negative first-layer weights: every ReLU unit is 0 on λ ∈ [0, 1] (the embedding cannot
    tell λ apart, and no gradient reaches the weights); leaky units still vary with λ."""
    lam = np.linspace(0, 1, 5, dtype=np.float32)[:, None]
    out = {}
    for act in ("relu", "leaky_relu"):
        net = _hypernet(1, 4, "t", act)
        net.set_weights([-np.ones((1, 4), np.float32), np.zeros(4, np.float32)])
        out[act] = net(lam).numpy()
    assert np.all(out["relu"] == 0)
    np.testing.assert_allclose(out["leaky_relu"], -0.2 * lam * np.ones((1, 4)), rtol=1e-6)


def test_activation_flows_from_config_and_is_validated():
    cfg = dataclasses.replace(get_preset("tiny2d"), hyp_activation="leaky_relu")
    model = build_hyper_vxm(cfg)
    names = [layer.name for layer in model.references.hyp_model.layers]
    assert sum("hyp_act" in n for n in names) == cfg.hyp_layers
    with pytest.raises(ContraRegInputError, match="hyp_activation 'tanh'"):
        build_hyper_vxm(dataclasses.replace(cfg, hyp_activation="tanh"))


def test_a_run_written_before_the_option_existed_is_the_same_run():
    cfg = json.loads(json.dumps(dataclasses.asdict(get_preset("tiny2d"))))
    old = {"config": {k: v for k, v in cfg.items() if k != "hyp_activation"}}
    assert _differences(_with_field_defaults(old, {"config": cfg}), {"config": cfg}) == []
    cfg["hyp_activation"] = "leaky_relu"
    assert _differences(_with_field_defaults(old, {"config": cfg}), {"config": cfg}) == \
        ["config.hyp_activation: 'relu' in the run, 'leaky_relu' now"]
