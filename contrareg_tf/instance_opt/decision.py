"""Whether instance optimisation keeps its deformable stage (``IOConfig.deformable``), as ANTs / greedy users
expect of a deformable step after an affine one: nothing is deformed that the data do not ask for.

The data term is the IO objective's similarity, evaluated on every voxel of the finest level's descriptor maps
(ψ_σ(D_F), ψ_σ(D_M), ``features.py``):

    S(u) = 1 − mean_x cos( ψ_σ D_F(x), ψ_σ D_M(x + u(x)) )

with S₀ = S(0) (the identity on the pre-aligned grid: the affine or world-space result) and S_φ = S(u*) at the
optimised displacement. Modes: 'on' keeps u*, 'off' never runs the stage, and 'auto' keeps u* only if

    (S₀ − S_φ) / S₀ > g        (g = ``IOConfig.deformable_min_gain``)

i.e. the deformable stage must remove more than the fraction g of the data term left after the pre-alignment.
The noise level behind g: on a pair that needs no deformation — the two contrasts of one subject, already
aligned, with independent bias fields, gamma, blur and noise — the optimiser still lowers S by fitting those
differences (the descriptors of two contrasts never agree exactly); the relative decreases measured there
(``bench/bench_io_intrasubject.py``, every preset) lie below g, those of pairs with a real deformation above
it (numbers in ``bench/results/io_intrasubject_*.md``). A relative rule, not an absolute one: S₀ itself depends
on the descriptor, the contrasts and σ. The paper has no such stage (it always deforms).
"""
import numpy as np
import tensorflow as tf

from .. import ops

DEFORMABLE_MODES = ("auto", "on", "off")


def cosine_dissimilarity(a, b):
    """Per-sample 1 − mean_x cos(a(x), b(x)) for (B, *vol, C)."""
    cos = ops.cosine(a, b)
    return 1.0 - tf.reduce_mean(tf.reshape(cos, [tf.shape(cos)[0], -1]), axis=-1)


def data_term(ff, fm, u=None):
    """S(u) of the module docstring, (B,) numpy: ``fm`` warped by the voxel displacement ``u`` (B, *vol, ndim)
    of the maps' grid (linear, ``ops.warp``; None = the identity) against ``ff``, every voxel."""
    moved = fm if u is None else ops.warp(fm, u)
    return cosine_dissimilarity(ff, moved).numpy()


def keep_deformable(s_identity, s_deformable, mode, min_gain):
    """(B,) bool: keep the deformable stage of each pair — always ('on'), never ('off'), or ('auto') when the
    relative decrease (S₀ − S_φ) / S₀ of its data term exceeds ``min_gain`` (module docstring)."""
    s0 = np.asarray(s_identity, np.float64)
    s1 = np.asarray(s_deformable, np.float64)
    if mode == "on":
        return np.ones(s0.shape, bool)
    if mode == "off":
        return np.zeros(s0.shape, bool)
    if mode != "auto":
        raise ValueError(f"deformable mode must be one of {DEFORMABLE_MODES}, got {mode!r}")
    return (s0 - s1) > float(min_gain) * np.abs(s0)
