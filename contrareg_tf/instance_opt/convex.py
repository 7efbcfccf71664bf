"""Coupled-convex discrete start of instance optimisation (``IOConfig.convex_init``; off in the paper preset).

Our transcription of the equations of convexAdam (Siebert, Hansen & Heinrich, *Fast 3D registration with accurate
optimisation and little learning for Learn2Reg 2021*; Heinrich et al., MICCAI 2013 / Heinrich, Papież, Schnabel &
Handels, WBIR 2014 for the coupled-convex scheme). Computed once, before the pyramid (``solver.py``), on the
full-size descriptors of ``features.py`` (ψ_σ included; with ``level_features`` those of the full-size images):

  1. Pooling: F = avgpool_g(ψ_σ D_F), M = avgpool_g(ψ_σ D_M), g = ``convex_grid`` full-size voxels per cell
     (kernel = stride = g, ⌊N/g⌋ cells per axis; cell i covers voxels g·i … g·i + g − 1, centre g·i + (g−1)/2).
  2. Cost volume over the discrete window d ∈ {−h..h}^n (h = ``convex_hw`` cells; K = (2h+1)^n labels, in
     ``itertools.product`` order, last axis fastest):
         C(x, d) = B₃^p [ Σ_c (F_c(x) − M_c(x + d))² ]
     M read at x + d clamped to the grid (replicate border, our convention; convexAdam zero-pads) and B₃^p =
     ``ops.box_filter(·, 3)`` applied p = ``convex_cost_smooth`` times per label (default 2 = convexAdam's two
     3³ average pools; replicate border). SSD, not cosine: the convexAdam cost (the later Adam stages keep
     the cosine of ``solver.py``).
  3. Coupled-convex optimisation: d⁰(x) = B₃[argmin_d C(x, d)], then for each coupling weight α_j of
     ``convex_coeffs`` (convexAdam's 0.003, 0.01, 0.03, 0.1, 0.3, 1 by default, increasing):
         dʲ(x) = B₃[ argmin_{d ∈ window} C(x, d) + α_j ‖d − dʲ⁻¹(x)‖² ]
     i.e. alternately a per-cell discrete minimisation (exact: every label is tried, so the non-convex data
     term is handled globally) and a smoothing step, B₃ = one 3^n box filter of the field (replicate border;
     convexAdam zero-pads, which pulls border cells towards 0). ‖d − d̄‖² = ‖d‖² − 2 d·d̄ + const, so each
     step is one (K × n) matrix product, an add and an argmin.
  4. Inverse consistency (``convex_ic_iters`` = T > 0, convexAdam's 15): the same steps with fixed and moving
     swapped give v (cells), then T Jacobi iterations
         u ← ½ (u − v∘(id + u)),   v ← ½ (v − u∘(id + v))
     (``ops.warp``, linear, border clamped), both right-hand sides from the previous iterate: a pair of exact
     inverses is a fixed point. T = 0 skips the backward problem (half the cost).
  5. Hand-over: the full-size displacement at voxel p is g · u at cell coordinate (p − (g−1)/2) / g (linear,
     ``ops.sample``, clamped), evaluated at the first level's control points p_j = j·(N−1)/(m−1) and written
     to the normalised parameter (× 2/(N−1)); Adam then refines from there. The label spacing is g voxels,
     so the init is coarse by construction; its capture range is ±h·g full-size voxels.
``IOResult.convex_seconds`` times steps 1–5 (features excluded). Measurements: ``bench/results/io_*.md``.
"""
import itertools
import math

import numpy as np
import tensorflow as tf

from .. import ops
from ..config import IO_PAPER
from ..errors import ContraRegInputError


def convex_offsets(hw, ndim):
    """(K, ndim) float32 displacement labels {−hw..hw}^ndim in ``itertools.product`` order (last axis fastest)."""
    return np.array(list(itertools.product(range(-int(hw), int(hw) + 1), repeat=int(ndim))), np.float32)


def pool_features(x, grid):
    """Average pooling of (B, *vol, C) with kernel = stride = ``grid`` (⌊n / grid⌋ cells per axis)."""
    g = int(grid)
    if g == 1:
        return tf.convert_to_tensor(x, tf.float32)
    return tf.nn.avg_pool(tf.convert_to_tensor(x, tf.float32), g, g, "VALID")


def cost_volume(ff, fm, hw, smooth=IO_PAPER.convex_cost_smooth):
    """C(x, d) = B₃^smooth[Σ_c (ff_c(x) − fm_c(x + d))²] for every label d of ``convex_offsets(hw)``:
    (B, *cells, C) × 2 → (B, *cells, K); fm read with a replicate border (step 2). One
    ``ops.shift`` of the padded fm per label (measured faster than ``tf.signal.frame`` windows of whole
    axes: 0.96 s vs 2.1 s for 32³ cells × 12 channels × 343 labels, loaded 2-core CPU)."""
    ff, fm = tf.convert_to_tensor(ff, tf.float32), tf.convert_to_tensor(fm, tf.float32)
    hw = int(hw)
    mp = ops.replicate_pad(fm, hw)
    shape = tf.shape(ff)[1:-1]
    cost = tf.stack([tf.reduce_sum(tf.square(ff - ops.shift(mp, d, hw, shape)), axis=-1)
                     for d in convex_offsets(hw, ops.spatial_ndim(ff)).astype(int)], -1)
    for _ in range(int(smooth)):
        cost = ops.box_filter(cost, 3)
    return cost


def coupled_convex(cost, hw, coeffs):
    """Coupled-convex optimisation of a cost volume (B, *cells, K) over the labels ``convex_offsets(hw)``:
    d⁰ = B₃[argmin_d C], dʲ = B₃[argmin_d C + α_j ‖d − dʲ⁻¹‖²] for α_j in ``coeffs`` → (B, *cells, ndim) in
    cells (step 3)."""
    ndim = len(cost.shape) - 2
    mesh = tf.constant(convex_offsets(hw, ndim))
    if mesh.shape[0] != cost.shape[-1]:
        raise ContraRegInputError(f"cost volume has {cost.shape[-1]} labels, half-width {hw} gives {mesh.shape[0]}")
    msq = tf.reduce_sum(tf.square(mesh), -1)

    def pick(c):
        return ops.box_filter(tf.gather(mesh, tf.argmin(c, axis=-1)), 3)

    d = pick(cost)
    for a in coeffs:
        d = pick(cost + float(a) * (msq - 2.0 * tf.tensordot(d, mesh, [[ndim + 1], [1]])))
    return d


def inverse_consistent(u, v, iters):
    """T Jacobi iterations u ← ½(u − v∘(id+u)), v ← ½(v − u∘(id+v)) (``ops.warp``; step 4)."""
    for _ in range(int(iters)):
        u, v = 0.5 * (u - ops.warp(v, u)), 0.5 * (v - ops.warp(u, v))
    return u, v


def check_cells(vol, grid):
    """At least 2 cells of ``grid`` voxels along every axis of ``vol``, else ContraRegInputError."""
    if min(int(n) // int(grid) for n in vol) < 2:
        raise ContraRegInputError(f"convex_grid {int(grid)}: the volume {tuple(vol)} has fewer than 2 cells per axis")


def convex_cells(F, M, hw=IO_PAPER.convex_hw, coeffs=IO_PAPER.convex_coeffs, ic_iters=IO_PAPER.convex_ic_iters,
                 cost_smooth=IO_PAPER.convex_cost_smooth):
    """Coupled-convex displacement (steps 2–4) of pooled features ``F``, ``M`` (B, *cells, C):
    (B, *cells, ndim) in cells."""
    u = coupled_convex(cost_volume(F, M, hw, cost_smooth), hw, coeffs)
    if ic_iters > 0:
        v = coupled_convex(cost_volume(M, F, hw, cost_smooth), hw, coeffs)
        u, _ = inverse_consistent(u, v, ic_iters)
    return u


def convex_init_fn(df, dm, grid=IO_PAPER.convex_grid, hw=IO_PAPER.convex_hw, coeffs=IO_PAPER.convex_coeffs,
                   ic_iters=IO_PAPER.convex_ic_iters, cost_smooth=IO_PAPER.convex_cost_smooth):
    """Coupled-convex displacement (steps 1–4) of full-size descriptors ``df``, ``dm``
    (B, *vol, C): (B, *cells, ndim) in **full-size voxels** (g × cells), cell i centred on voxel g·i + (g−1)/2."""
    g = int(grid)
    check_cells(df.shape[1:-1], g)
    return convex_cells(pool_features(df, g), pool_features(dm, g), hw, coeffs, ic_iters, cost_smooth) * float(g)


def convex_param(u, grid, vol, pshape):
    """Normalised parameter on the control grid ``pshape`` (spanning the full-size ``vol``) of the cell-grid
    displacement ``u`` (full-size voxels; step 5)."""
    g = float(grid)
    axes = [np.clip((np.arange(m) * (n - 1) / max(m - 1, 1) - (g - 1) / 2) / g, 0, c - 1)
            for m, n, c in zip(pshape, vol, u.shape[1:-1])]
    loc = np.stack(np.meshgrid(*axes, indexing="ij"), -1).astype(np.float32)
    loc = tf.constant(np.broadcast_to(loc, (u.shape[0], *loc.shape)))
    return ops.sample(u, loc) * tf.constant([2.0 / (n - 1) for n in vol], tf.float32)


def check_convex(schedule, vol):
    """Validate the convex start's settings of ``schedule`` (an ``IOConfig``) for a volume ``vol`` before anything
    is computed; returns the coupling weights as a list of floats."""
    coeffs = [float(a) for a in np.atleast_1d(schedule.convex_coeffs)]
    if (int(schedule.convex_grid) < 1 or int(schedule.convex_hw) < 1
            or min(int(schedule.convex_ic_iters), int(schedule.convex_cost_smooth)) < 0
            or not all(math.isfinite(a) and a >= 0 for a in coeffs)):
        raise ContraRegInputError(f"need convex_grid >= 1, convex_hw >= 1, convex_ic_iters >= 0, "
                                  f"convex_cost_smooth >= 0 and finite convex_coeffs >= 0; got {schedule.convex_grid}, "
                                  f"{schedule.convex_hw}, {schedule.convex_ic_iters}, {schedule.convex_cost_smooth}, "
                                  f"{coeffs}")
    check_cells(vol, schedule.convex_grid)
    return coeffs


def convex_start(pooled, schedule, vol, pshape):
    """Steps 2–5 on the pooled maps ``pooled`` = (F, M): the first level's normalised parameter on the control grid
    ``pshape`` and the cell-grid displacement (B, *cells, ndim) in full-size voxels."""
    u = convex_cells(*pooled, schedule.convex_hw, check_convex(schedule, vol), int(schedule.convex_ic_iters),
                     int(schedule.convex_cost_smooth)) * float(schedule.convex_grid)
    return convex_param(u, schedule.convex_grid, vol, pshape), u
