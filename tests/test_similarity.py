"""Loss names parsed once (LossSpec), the registry (build_similarity) and the bidirectional combinator."""
import numpy as np
import pytest
import tensorflow as tf

from contrareg_tf.config import PAPER
from contrareg_tf.errors import ContraRegInputError
from contrareg_tf.losses import LOSS_NAMES, LossSpec, build_similarity
from contrareg_tf.networks.autoencoder import build_autoencoder, feature_channels
from contrareg_tf.networks.heads import build_heads


def test_every_loss_name_parses_to_its_flags():
    seen = set()
    for name in LOSS_NAMES:
        s = LossSpec.parse(name)
        assert s.name == name and s.base in ("mcr", "cr", "mi", "lmi", "mind", "ngf", "dns", "core", "accr",
                                             "accr-noattn")
        assert s.add_mi == ("+mi" in name) and s.ext_negs == s.needs_ext == ("+extnegs" in name)
        assert s.contrastive == (s.base in ("cr", "mcr"))
        assert s.masked == s.needs_masks == (s.base == "mcr")
        assert s.joint == (s.base in ("core", "accr", "accr-noattn"))
        assert s.needs_labels == s.base.startswith("accr")
        if not s.joint:
            assert s.alpha(PAPER) == (PAPER.alpha_contrastive if s.contrastive else 1.0)
        seen.add(s)
    assert len(seen) == len(LOSS_NAMES)          # frozen, hashable, distinct
    assert LossSpec.parse(" MCR+ExtNegs ") == LossSpec.parse("mcr+extnegs")
    assert LossSpec.parse(LossSpec.parse("cr")) == LossSpec.parse("cr")


@pytest.mark.parametrize("bad", ["mse", "cr+randae", "mi+cr", "", "mcr+"])
def test_unknown_loss_names_fail_with_one_message(bad):
    with pytest.raises(ContraRegInputError, match="unknown loss"):
        LossSpec.parse(bad)


def test_contrastive_loss_without_autoencoders_is_refused():
    with pytest.raises(ContraRegInputError, match="two autoencoders"):
        build_similarity("mcr")


def test_bidirectional_combinator_averages_the_two_directions_and_adds_mi():
    rng = np.random.default_rng(0)
    i1, i2, m2, m1 = (tf.constant(rng.random((2, 16, 16, 1)), tf.float32) for _ in range(4))
    sim = build_similarity("mi")
    t = sim(i1, i2, m2, m1)
    d12 = sim.d12.loss(i1, m2).numpy()
    d21 = sim.d21.loss(i2, m1).numpy()
    np.testing.assert_allclose(t["d12"].numpy(), d12, rtol=1e-6)
    np.testing.assert_allclose(t["d21"].numpy(), d21, rtol=1e-6)
    np.testing.assert_allclose(t["sim"].numpy(), 0.5 * (d12 + d21), rtol=1e-6)
    assert t["sim"].shape == (2,)


def test_mcr_training_terms_warp_the_masks_with_the_flows():
    """With zero flows the moved-side masks equal the input masks; with a shift of one voxel they move."""
    filters = (4, 6, 8, 6, 4, 4, 4, 1)
    a1, a2 = (build_autoencoder(2, filters, seed=s) for s in (0, 1))
    chans = feature_channels(filters, 6)
    h1, h2 = (build_heads(chans, units=8, nb_layers=2, name=n) for n in ("h1", "h2"))
    sim = build_similarity("mcr", PAPER, a1, a2, h1, h2, seed=0)
    mask = np.zeros((1, 16, 16, 1), np.float32)
    mask[:, 4:12, 4:12] = 1
    seen = []
    sim._contrastive = lambda i1, m2, i2, m1, masks12, masks21, e2, e1: (seen.extend([masks12, masks21])
                                                                        or (tf.zeros(1), tf.zeros(1)))
    img = tf.zeros((1, 16, 16, 1))
    b = {"img1": img, "img2": img, "mask1": tf.constant(mask), "mask2": tf.constant(mask)}
    zero = tf.zeros((1, 16, 16, 2))
    sim.training_terms(b, img, img, zero, zero)
    for mf, mm in seen:
        np.testing.assert_array_equal(mf.numpy(), mask)
        np.testing.assert_array_equal(mm.numpy(), mask)
    seen.clear()
    shift = tf.concat([tf.ones((1, 16, 16, 1)), tf.zeros((1, 16, 16, 1))], -1)   # φ(x) = x + e_0
    sim.training_terms(b, img, img, shift, shift)
    np.testing.assert_array_equal(seen[0][1].numpy()[0, 3:11, 4:12, 0], 1)         # moved up by one row
    assert seen[0][1].numpy()[0, 11, 4:12, 0].sum() == 0
