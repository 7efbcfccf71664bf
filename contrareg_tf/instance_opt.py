"""Instance optimisation (IO) registration with structural descriptors (DNS paper, CVPR 2024, §3.4 and
supplementary B.1 / Table 4 — Mok et al., *Modality-Agnostic Structural Image Representation Learning
for Deformable Multi-Modality Medical Image Registration*).

    φ* = argmin_φ  −cos( ψ_σ(D_F), ψ_σ(D_M) ∘ φ ) + λ_reg · ‖∇u‖²,   φ(x) = x + u(x)

* Descriptors D_F, D_M are computed **once** on the full-resolution images (MIND-SSC, MIND, DNS or the
  ContraReg autoencoder features), Gaussian-smoothed (ψ_σ, σ = ``smooth_sigma`` full-res voxels, replicate
  border) and resampled linearly (align-corners) to each pyramid level.
* Pyramid (Table 4: 3 levels, half → full size): level k of L has shape round(N · s_k) with geometric scales
  s_k = min_scale^((L−1−k)/(L−1)) = 1/2, 1/√2, 1 for L = 3 (``min_scale=0.5``).
* Parameterisation (the paper leaves it open; our choice): a dense displacement (or, ``diffeomorphic=True``,
  a stationary velocity field integrated by scaling and squaring, ``int_steps``) held as a
  ``tf.Variable`` in **normalised coordinates** ([-1, 1] spans each axis: the PyTorch ``grid_sample`` /
  LapIRN convention; the authors' IO code is not public). This is the reading under which Table 4's lrs
  [1e-2, 5e-3, 3e-3] move the field by useful amounts in [100, 80, 50] Adam steps. Voxel displacement at a
  level of shape n: u = u_norm · (n − 1) / 2; between levels the normalised field is upsampled linearly
  (align-corners), which is the same as upsampling the voxel field and scaling it by (n_new−1)/(n_old−1).
* Similarity: 1 − mean over voxels of the cosine of D_F and D_M∘φ (the negated cosine shifted by 1 so that
  0 = perfect), D_M warped linearly (ij, border-clamped). Warping, integration, resizing, ψ_σ and the
  regulariser are the shared primitives of ``contrareg_tf.ops`` (``warp``, ``integrate``, ``resize_linear``,
  ``gaussian_smooth``, ``grad``): the same ψ_σ as the DNS loss.
  Regulariser: diffusion ‖∇u‖² (= vxm ``Grad('l2')``) of the displacement **in voxels of the current level**
  (a dimensionless strain, comparable across levels); weights [0.6, 0.5, 0.4].
* Faster schedules (named presets, ``config.IO_PRESETS``; the paper's Table 4 stays the default) use three
  options the paper does not have. (i) ``max_scale`` / ``min_scale``: the pyramid's end points.
  (ii) ``grid_step`` g (convexAdam's ``grid_sp_adam``, Siebert et al. 2021): the parameter lives on a control
  grid of m = round(n / g) points per axis and the displacement on the level's n-grid is its linear
  (align-corners) upsampling, u = R_z R_y R_x u_grid · (n − 1)/(m − 1) (R = ``ops.linear_weights``); the
  regulariser is ‖∇u_grid‖² in control-grid voxels. (iii) ``sample_stride`` s: each Adam step evaluates the
  similarity on the sub-grid x = o + s·k (k = 0..⌊n/s⌋ − 1) with a random phase o ∈ {0..s−1}^n per step
  (seeded, so runs repeat): 1 − mean_k cos(D_F(x_k), D_M(x_k + u(x_k))), where u(x_k) takes only the rows
  o, o+s, … of R and D_M is read at those points (``ops.sample``) — a stochastic estimate of the full
  similarity at 1/s^n of the cost. ``level_features=True`` computes the descriptors per level on the
  resampled images instead of once at full size (cheaper, but measured worse on the 128³ brain pair: Dice
  0.72 vs 0.79, so the fast preset keeps full-size descriptors).
* Profile (128³ @ 1.5 mm brain pair, 2 shared CPU cores, load 5–7; one traced step of the Table 4 schedule):
  level 64³ 0.28 s (vxm warp fwd+bwd 0.14, cosine 0.03, ‖∇u‖² 0.02, Adam 0.004), 91³ 2.8 s, 128³ 5.9 s
  (warp 3.8, cosine 1.5, ‖∇u‖² 0.25); MIND-SSC of one 128³ image 8 s and ψ_σ of its 12 channels 10 s before
  ``ops.box_filter`` / ``ops.gaussian_smooth`` became shifted-slice sums (then ~3–5 s each). The warp's
  backward is not a scatter here (the descriptors are not differentiated), and an analytic-gradient warp
  (one gather of a precomputed 2^n-corner table, exact gradient) measured 2× slower than vxm's at 64³,
  so the warp is unchanged; the savings come from fewer points per step (ii, iii).
* Coupled-convex discrete initialisation (``convex_init=True``; off in the paper preset), our transcription of
  the equations of convexAdam (Siebert, Hansen & Heinrich, *Fast 3D registration with accurate optimisation
  and little learning for Learn2Reg 2021*; Heinrich et al., MICCAI 2013 / Heinrich, Papież, Schnabel &
  Handels, WBIR 2014 for the coupled-convex scheme). Computed once, before the pyramid, on the full-size
  descriptors of the first paragraph (ψ_σ included; with ``level_features`` those of the full-size images):

  1. Pooling: F = avgpool_g(ψ_σ D_F), M = avgpool_g(ψ_σ D_M), g = ``convex_grid`` full-size voxels per cell
     (kernel = stride = g, ⌊N/g⌋ cells per axis; cell i covers voxels g·i … g·i + g − 1, centre g·i + (g−1)/2).
  2. Cost volume over the discrete window d ∈ {−h..h}^n (h = ``convex_hw`` cells; K = (2h+1)^n labels, in
     ``itertools.product`` order, last axis fastest):
         C(x, d) = B₃^p [ Σ_c (F_c(x) − M_c(x + d))² ]
     M read at x + d clamped to the grid (replicate border, our convention; convexAdam zero-pads) and B₃^p =
     ``ops.box_filter(·, 3)`` applied p = ``convex_cost_smooth`` times per label (default 2 = convexAdam's two
     3³ average pools; replicate border). SSD, not cosine: the convexAdam cost (the later Adam stages keep
     the cosine of this module).
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
  ``IOResult.convex_seconds`` times steps 1–5 (features excluded). Profile and measurements: the fast presets'
  comment in ``config.py`` and ``bench/results/``.
* A batch of B pairs is optimised jointly with the loss summed over the batch (Adam is element-wise, so
  each pair follows the same path as alone). The inner Adam step is a ``tf.function``; the per-level
  variable / optimiser / traced step are cached by (B, shape, channels, parameterisation), so registering
  many pairs of one size traces once.
"""
import collections
import functools
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf

from . import ops
from .config import IO_PAPER, PAPER
from .errors import ContraRegInputError, RegistrationDiverged

# the DNS paper's Table-4 schedule (config.IOConfig holds the values)
IO_LEVELS, IO_LRS, IO_ITERS = IO_PAPER.levels, IO_PAPER.lrs, IO_PAPER.iters
IO_REG_WEIGHTS, IO_SMOOTH_SIGMA, IO_MIN_SCALE = IO_PAPER.reg_weights, IO_PAPER.smooth_sigma, IO_PAPER.min_scale
FEATURE_NAMES = ("mindssc", "mind", "dns", "ae")


@dataclass
class IOResult:
    """Output of :func:`instance_optimise` (numpy, batch first)."""
    disp: np.ndarray                      # (B, *vol, ndim) voxel units, ij: φ(x) = x + u(x)
    moved: np.ndarray                     # (B, *vol, C) moving image warped by φ (linear)
    inverse: Optional[np.ndarray] = None  # (B, *vol, ndim) displacement of φ⁻¹ (diffeomorphic only)
    velocity: Optional[np.ndarray] = None  # (B, *vol, ndim) SVF in voxels (diffeomorphic only)
    history: List[dict] = field(default_factory=list)  # per level: shape, lr, iters, loss/sim/reg arrays (B, it)
    level_shapes: List[Tuple[int, ...]] = field(default_factory=list)
    seconds: float = 0.0                  # optimisation wall time (features included)
    feature_seconds: float = 0.0          # of which descriptors (ψ_σ and resampling included)
    convex_seconds: float = 0.0           # of which the coupled-convex initialisation (features excluded)
    convex_disp: Optional[np.ndarray] = None  # (B, *cells, ndim) its displacement in full-size voxels

    @property
    def final_similarity(self):
        """(B,) similarity term (1 − mean cosine) after the last step."""
        return self.history[-1]["sim"][:, -1] if self.history else None


# ------------------------------------------------------------------------------------------ validation
def _as_batch(x, name, ndim=None):
    x = x.numpy() if hasattr(x, "numpy") else x
    return ops.check_image(x, name, ndim=ndim, min_size=4).numpy().astype(np.float32)


def _per_level(v, levels, name, cast=float):
    if np.isscalar(v):
        return [cast(v)] * levels
    v = list(v)
    if len(v) != levels:
        raise ContraRegInputError(f"{name}: expected {levels} values (one per level), got {len(v)}: {v}")
    return [cast(x) for x in v]


def check_schedule(levels, lrs, iters, reg_weights, smooth_sigma=IO_SMOOTH_SIGMA, int_steps=7):
    """Validate the optimisation schedule before anything is computed: ``levels`` >= 1, one (or a broadcast
    scalar) finite lr > 0, iters >= 0 and finite reg weight >= 0 per level, a finite ``smooth_sigma`` >= 0,
    ``int_steps`` >= 0. Returns ``(levels, lrs, iters, reg_weights)`` as per-level lists."""
    levels = int(levels)
    if levels < 1:
        raise ContraRegInputError(f"levels must be >= 1, got {levels}")
    lrs = _per_level(lrs, levels, "lrs")
    iters = _per_level(iters, levels, "iters", int)
    regw = _per_level(reg_weights, levels, "reg_weights")
    for name, vals in (("lrs", lrs), ("reg_weights", regw), ("smooth_sigma", [smooth_sigma or 0.0])):
        if not all(math.isfinite(v) for v in vals):
            raise ContraRegInputError(f"{name} must be finite numbers, got {vals}")
    if any(i < 0 for i in iters) or any(lr <= 0 for lr in lrs) or any(w < 0 for w in regw):
        raise ContraRegInputError(f"need lrs > 0, iters >= 0, reg_weights >= 0; got {lrs}, {iters}, {regw}")
    if smooth_sigma is not None and smooth_sigma < 0:
        raise ContraRegInputError(f"smooth_sigma must be >= 0 (0 = no smoothing), got {smooth_sigma}")
    if int(int_steps) < 0:
        raise ContraRegInputError(f"int_steps must be >= 0, got {int_steps}")
    return levels, lrs, iters, regw


def level_shapes(shape, levels=IO_LEVELS, min_scale=IO_MIN_SCALE, max_scale=1.0):
    """Pyramid shapes, coarsest first: round(N · s_k), geometric scales s_k from ``min_scale`` (k = 0) to
    ``max_scale`` (k = L−1; 1 = full size N): s_k = min_scale^((L−1−k)/(L−1)) · max_scale^(k/(L−1))."""
    if levels < 1:
        raise ContraRegInputError(f"levels must be >= 1, got {levels}")
    if not 0 < min_scale <= max_scale <= 1:
        raise ContraRegInputError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
    out = []
    for k in range(levels):
        s = max_scale if levels == 1 else (min_scale ** ((levels - 1 - k) / (levels - 1))
                                           * max_scale ** (k / (levels - 1)))
        out.append(tuple(max(2, int(round(n * s))) for n in shape))
    return out


# --------------------------------------------------------------------------------- feature providers
def ae_features(model, image, layers=None):
    """ContraReg autoencoder features (outputs [recon, f1..f6]): each chosen layer (1-based, default all)
    linearly upsampled to full resolution, L2-normalised per voxel across its channels, concatenated."""
    outs = model(tf.convert_to_tensor(image, tf.float32), training=False)
    if not isinstance(outs, (list, tuple)) or len(outs) < 2:
        raise ContraRegInputError("autoencoder must output [recon, f1, ..., fk]")
    feats = list(outs[1:])
    idx = range(1, len(feats) + 1) if layers is None else layers
    vol = tuple(image.shape[1:-1])
    parts = []
    for i in idx:
        if not 1 <= i <= len(feats):
            raise ContraRegInputError(f"autoencoder feature layer {i} out of range 1..{len(feats)}")
        f = feats[i - 1]
        if tuple(f.shape[1:-1]) != vol:
            f = ops.resize_linear(f, vol)
        parts.append(ops.l2_normalize(f))
    return tf.concat(parts, axis=-1)


def _load_model(obj, loader, what):
    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        return loader(obj)
    if obj is None:
        raise ContraRegInputError(f"features '{what}' need a model (path or Keras model)")
    return obj


_MIND_FEATURES = ("mindssc", "mind")


@functools.lru_cache(maxsize=8)   # bounded like the solver cache: one entry per (setting, level shapes)
def _mind_fn(variant, distance, patch, sigma=0.0, shapes=None, grid=0):
    """MIND / MIND-SSC (``losses.mind``'s equations) as one XLA-compiled function, one per setting (retraced per
    input shape). ``shapes`` None: the descriptors; otherwise a tuple: ψ_σ of them resized
    (``ops.resize_linear``) to each shape of ``shapes``, then, ``grid`` > 0, pooled on ``grid``-voxel cells
    (``pool_features``; the convex start). Same numbers as the eager ops up to float rounding. Measured on
    128³ images, 2 CPU cores, after the first call: the convex preset's maps 1.2–1.6 s vs 2.1–2.4 s as separate
    calls; the paper preset's (ψ_σ, 3 levels) 4.3–6.3 s vs 10–12 s with eager ψ_σ and resizes. Fixed and
    moving are two calls: as one batch of two the paper preset's maps took 7–14 s and 3.9 GB peak RSS vs
    2.4 GB."""
    from .losses import mind as M

    def fn(x):
        d = M.mind_ssc(x, distance, patch // 2) if variant == "mindssc" else M.mind(x, distance, patch)
        if shapes is None:
            return d
        d = ops.gaussian_smooth(d, sigma)
        return tuple(ops.resize_linear(d, s) for s in shapes) + ((pool_features(d, grid),) if grid else ())

    return tf.function(fn, jit_compile=True, autograph=False)


def feature_provider(features="mindssc", ndim=3, dns_model=None, ae_models=None, moving_modality="t1",
                     ae_layers=None, mind_distance=PAPER.mind_distance, mind_patch=PAPER.mind_patch):
    """Return ``(f_fixed, f_moving)``, callables (B,*vol,1) → (B,*vol,C).

    ``features``: 'mindssc' (dilation = mind_distance, radius = mind_patch // 2), 'mind', 'dns'
    (``dns_model``: a MASR-Net Keras model or a .h5 path, default the shipped ``models/dns_proxy{2,3}d.h5``;
    descriptors by ``networks.masr.dns_features``, L2-normalised; any size: mirror-padded to a multiple of 8
    and cropped back, ``_pad8``), 'ae'
    (``ae_models=(A1, A2)``: T1w and T2w autoencoders, models or .h5 paths; A1 is applied to the image whose
    modality is T1w: the moving one when ``moving_modality='t1'``), a callable used for both images, or a
    pair of callables (fixed, moving)."""

    if isinstance(features, (tuple, list)) and len(features) == 2 and all(callable(f) for f in features):
        return features[0], features[1]
    if callable(features):
        return features, features
    if features in _MIND_FEATURES:
        f = _mind_fn(features, int(mind_distance), int(mind_patch))
        return f, f
    if features == "dns":
        try:
            from .losses.dns import dns_features
        except ImportError:
            from .networks.masr import dns_features

        def _load(p):
            from .networks.masr import load_masr
            return load_masr(p, ndim)

        if dns_model is None:  # the shipped weights for this dimensionality (losses/dns.py), if present
            import os

            from .losses.dns import default_weights_path

            if not os.path.isfile(default_weights_path(ndim)):
                raise ContraRegInputError(f"features 'dns' need a MASR-Net model (dns_model=path or Keras "
                                          f"model); no shipped {ndim}-D weights at {default_weights_path(ndim)}")
            dns_model = default_weights_path(ndim)
        model = _load_model(dns_model, _load, "dns")
        f = lambda x: _pad8(lambda y: dns_features(y, model), x)  # noqa: E731
        return f, f
    if features == "ae":
        if ae_models is None or len(ae_models) != 2:
            raise ContraRegInputError("features 'ae' need two autoencoders (ae_models=(A1 T1w, A2 T2w))")
        if moving_modality not in ("t1", "t2"):
            raise ContraRegInputError(f"moving_modality must be 't1' or 't2', got {moving_modality!r}")

        def _load(p):
            from .networks.autoencoder import load_autoencoder
            return load_autoencoder(p, ndim)

        a1, a2 = (_load_model(m, _load, "ae") for m in ae_models)
        am, af = (a1, a2) if moving_modality == "t1" else (a2, a1)
        return (lambda x: ae_features(af, x, ae_layers)), (lambda x: ae_features(am, x, ae_layers))
    raise ContraRegInputError(f"unknown features {features!r}; choose one of {', '.join(FEATURE_NAMES)} "
                              f"or pass a callable")


def _pad8(feature_fn, x):
    """``feature_fn`` (MASR-Net: sizes divisible by 8) on ``x`` (B, *vol, C) of any size: symmetric (mirror)
    padding of each spatial axis up to the next multiple of 8 (the extra voxel of an odd amount at the end),
    descriptors cropped back to ``x``'s grid. Sizes already divisible by 8 pass through unchanged."""
    x = tf.convert_to_tensor(x, tf.float32)
    vol = x.shape[1:-1]
    pads = [((-n) % 8) for n in vol]
    if not any(pads):
        return feature_fn(x)
    spec = [[0, 0]] + [[p // 2, p - p // 2] for p in pads] + [[0, 0]]
    y = feature_fn(tf.pad(x, spec, mode="SYMMETRIC"))
    return y[(slice(None),) + tuple(slice(p // 2, p // 2 + n) for p, n in zip(pads, vol))]


# -------------------------------------------------------------------------------------------- core
AA_SIGMA = 0.5


def _downsample(x, shape):
    """Anti-aliased linear resize: ψ with σ = AA_SIGMA · (N/n − 1)... voxels, then ``resize_linear``."""
    f = max(n / m for n, m in zip(x.shape[1:-1], shape))
    if f > 1:
        x = ops.gaussian_smooth(x, AA_SIGMA * f)
    return ops.resize_linear(x, shape)


def _cosine_dissimilarity(a, b):
    """Per-sample 1 − mean_x cos(a(x), b(x)) for (B, *vol, C)."""
    cos = ops.cosine(a, b)
    return 1.0 - tf.reduce_mean(tf.reshape(cos, [tf.shape(cos)[0], -1]), axis=-1)


def _feature_maps(features, fx, mv, sigma, shapes, grid=0, level_features=False, **feature_kwargs):
    """ψ_σ(D_F), ψ_σ(D_M) for each level shape of ``shapes`` (module docstring, first paragraph: computed once at
    full size and resized, or with ``level_features`` per level on the images resampled there) and, ``grid``
    > 0, both full-size maps pooled on ``grid``-voxel cells (the convex start). MIND / MIND-SSC at full size:
    all of it one XLA call per image (``_mind_fn``). Returns (list of (df, dm) per level, (F, M) or None)."""
    if isinstance(features, str) and features in _MIND_FEATURES and not level_features:
        fn = _mind_fn(features, int(feature_kwargs.get("mind_distance", PAPER.mind_distance)),
                      int(feature_kwargs.get("mind_patch", PAPER.mind_patch)), float(sigma or 0.0),
                      tuple(tuple(int(n) for n in sh) for sh in shapes), int(grid))
        pairs = list(zip(fn(fx), fn(mv)))
    else:
        f_fix, f_mov = feature_provider(features, ndim=fx.ndim - 2, **feature_kwargs)

        def both(a, b):                  # ψ_σ(D_F(a)), ψ_σ(D_M(b))
            da, db = f_fix(a), f_mov(b)
            if da.shape != db.shape or da.shape[:-1] != a.shape[:-1]:
                raise ContraRegInputError(f"feature maps must be (B, *vol, C) and equal: got {da.shape}, {db.shape}")
            return ops.gaussian_smooth(da, sigma), ops.gaussian_smooth(db, sigma)

        if level_features:
            pairs = [both(_downsample(fx, sh), _downsample(mv, sh)) for sh in shapes]
            full = both(fx, mv) if grid else None
        else:
            full = both(fx, mv)
            pairs = [(ops.resize_linear(full[0], sh), ops.resize_linear(full[1], sh)) for sh in shapes]
        if grid:
            pairs.append((pool_features(full[0], grid), pool_features(full[1], grid)))
    for df, dm in pairs:
        if not bool(tf.reduce_all(tf.math.is_finite(df))) or not bool(tf.reduce_all(tf.math.is_finite(dm))):
            raise ContraRegInputError("feature maps contain NaN/Inf")
    return pairs[:len(shapes)], (pairs[len(shapes)] if grid else None)


# ------------------------------------------------------------------------- coupled-convex initialisation
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
    (B, *cells, C) × 2 → (B, *cells, K); fm read with a replicate border (module docstring, step 2). One
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
    cells (module docstring, step 3)."""
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
    """T Jacobi iterations u ← ½(u − v∘(id+u)), v ← ½(v − u∘(id+v)) (``ops.warp``; module docstring, step 4)."""
    for _ in range(int(iters)):
        u, v = 0.5 * (u - ops.warp(v, u)), 0.5 * (v - ops.warp(u, v))
    return u, v


def _check_cells(vol, grid):
    if min(int(n) // int(grid) for n in vol) < 2:
        raise ContraRegInputError(f"convex_grid {int(grid)}: the volume {tuple(vol)} has fewer than 2 cells per axis")


def convex_cells(F, M, hw=IO_PAPER.convex_hw, coeffs=IO_PAPER.convex_coeffs, ic_iters=IO_PAPER.convex_ic_iters,
                 cost_smooth=IO_PAPER.convex_cost_smooth):
    """Coupled-convex displacement (module docstring, steps 2–4) of pooled features ``F``, ``M`` (B, *cells, C):
    (B, *cells, ndim) in cells."""
    u = coupled_convex(cost_volume(F, M, hw, cost_smooth), hw, coeffs)
    if ic_iters > 0:
        v = coupled_convex(cost_volume(M, F, hw, cost_smooth), hw, coeffs)
        u, _ = inverse_consistent(u, v, ic_iters)
    return u


def convex_init_fn(df, dm, grid=IO_PAPER.convex_grid, hw=IO_PAPER.convex_hw, coeffs=IO_PAPER.convex_coeffs,
                   ic_iters=IO_PAPER.convex_ic_iters, cost_smooth=IO_PAPER.convex_cost_smooth):
    """Coupled-convex displacement (module docstring, steps 1–4) of full-size descriptors ``df``, ``dm``
    (B, *vol, C): (B, *cells, ndim) in **full-size voxels** (g × cells), cell i centred on voxel g·i + (g−1)/2."""
    g = int(grid)
    _check_cells(df.shape[1:-1], g)
    return convex_cells(pool_features(df, g), pool_features(dm, g), hw, coeffs, ic_iters, cost_smooth) * float(g)


def _control_shape(shape, grid_step):
    """The control grid of a level of ``shape``: ``grid_step`` voxels per control point, at least 2 per axis."""
    return tuple(max(2, int(round(n / grid_step))) for n in shape)


def _convex_param(u, grid, vol, pshape):
    """Normalised parameter on the control grid ``pshape`` (spanning the full-size ``vol``) of the cell-grid
    displacement ``u`` (full-size voxels; module docstring, step 5)."""
    g = float(grid)
    axes = [np.clip((np.arange(m) * (n - 1) / max(m - 1, 1) - (g - 1) / 2) / g, 0, c - 1)
            for m, n, c in zip(pshape, vol, u.shape[1:-1])]
    loc = np.stack(np.meshgrid(*axes, indexing="ij"), -1).astype(np.float32)
    loc = tf.constant(np.broadcast_to(loc, (u.shape[0], *loc.shape)))
    return ops.sample(u, loc) * tf.constant([2.0 / (n - 1) for n in vol], tf.float32)


class _LevelSolver:
    """Adam on one pyramid level: the variable, optimiser and traced step for one (batch, shape, channels,
    parameterisation). Kept in a small cache so repeated registrations of the same size reuse the trace;
    ``reset`` re-initialises every state (variable, features, Adam moments and step count, lr, weight)."""

    def __init__(self, bsz, shape, nch, diffeomorphic, int_steps, stride=1, pshape=None):
        ndim = len(shape)
        self.shape, self.stride = tuple(shape), int(stride)
        self.pshape = tuple(pshape or shape)                 # the control grid the parameter lives on
        self.rng = tf.random.Generator.from_seed(0)
        self.grid = tf.constant(np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape],
                                                     indexing="ij"), -1)[None])
        self.var = tf.Variable(tf.zeros((bsz, *self.pshape, ndim)), name="io_param")
        self.ff = tf.Variable(tf.zeros((bsz, *shape, nch)), trainable=False, name="io_fixed_feat")
        self.fm = tf.Variable(tf.zeros((bsz, *shape, nch)), trainable=False, name="io_moving_feat")
        self.w = tf.Variable(0.0, trainable=False, name="io_reg_weight")
        self.opt = tf.keras.optimizers.Adam(learning_rate=1e-3)
        self.opt.build([self.var])
        self.scale = tf.constant([(n - 1) / 2.0 for n in self.pshape], tf.float32)
        self.up = tf.constant([(n - 1) / max(m - 1, 1) for n, m in zip(shape, self.pshape)], tf.float32)
        s = self.stride           # per axis: (s, n // s, m) rows o, o + s, ... of the upsampling matrix
        self.rows = [tf.constant(np.stack([ops.linear_weights(n, m)[o::s][:n // s] for o in range(s)]))
                     for n, m in zip(shape, self.pshape)]
        self.diffeomorphic, self.int_steps = diffeomorphic, int_steps
        self.step = tf.function(self._step, autograph=False)

    def disp(self, p):
        """Normalised parameter → voxel displacement on the control grid (integrated if diffeomorphic)."""
        u = p * self.scale
        return ops.integrate(u, self.int_steps) if self.diffeomorphic else u

    def dense(self, u):
        """Control-grid displacement → displacement in voxels of the level's feature grid (linear)."""
        if self.pshape == self.shape:
            return u
        return ops.resize_linear(u, self.shape) * self.up

    def _similarity(self, u):
        """1 − mean cos(D_F, D_M∘φ) for the control-grid displacement ``u``: over every voxel of the level
        (stride 1), or over the sub-grid x ≡ o (mod s) with a random phase o ∈ {0..s−1}^n drawn each step
        (s = ``sample_stride``; 1/s^n of the voxels); the linear upsampling of ``u`` is evaluated at those
        points only (rows o, o+s, … of the align-corners interpolation matrices)."""
        if self.stride == 1:
            return _cosine_dissimilarity(self.ff, ops.warp(self.fm, self.dense(u)))
        s, ndim = self.stride, len(self.shape)
        m = [n // s for n in self.shape]
        phase = self.rng.uniform([ndim], 0, s, dtype=tf.int32)
        begin = tf.concat([[0], phase, [0]], 0)

        def sub(x):
            out = tf.strided_slice(x, begin, begin + tf.constant([x.shape[0]] + [(k - 1) * s + 1 for k in m]
                                                                 + [x.shape[-1]]), [1] + [s] * ndim + [1])
            out.set_shape([x.shape[0], *m, x.shape[-1]])
            return out

        letters = "xyz"[:ndim]
        for ax, letter in enumerate(letters):      # u at the sampled points, one axis at a time
            src = "b" + letters + "c"
            mat = tf.gather(self.rows[ax], phase[ax])
            u = tf.einsum(f"o{letter},{src}->{src.replace(letter, 'o')}", mat, u)
        return _cosine_dissimilarity(sub(self.ff), ops.sample(self.fm, sub(self.grid) + u * self.up))

    def _step(self):
        with tf.GradientTape() as tape:
            u = self.disp(self.var)
            sim = self._similarity(u)
            reg = ops.grad(u, "l2")
            loss = sim + self.w * reg
            total = tf.reduce_sum(loss)  # sum over pairs: each pair's Adam path is independent of B
        self.opt.apply_gradients([(tape.gradient(total, self.var), self.var)])
        return loss, sim, reg

    def reset(self, init, ff, fm, lr, w):
        self.var.assign(init)
        self.ff.assign(ff)                 # ops.cosine normalises both sides
        self.fm.assign(fm)
        self.rng.reset_from_seed(0)
        self.w.assign(w)
        for v in self.opt.variables:
            v.assign(tf.zeros_like(v))
        self.opt.learning_rate = lr


_SOLVERS = collections.OrderedDict()
_MAX_SOLVERS = 6


def _solver(*key):
    if key in _SOLVERS:
        _SOLVERS.move_to_end(key)
    else:
        _SOLVERS[key] = _LevelSolver(*key)
        while len(_SOLVERS) > _MAX_SOLVERS:
            _SOLVERS.popitem(last=False)
    return _SOLVERS[key]


def instance_optimise(fixed, moving, features="mindssc", levels=IO_LEVELS, lrs=IO_LRS, iters=IO_ITERS,
                      reg_weights=IO_REG_WEIGHTS, smooth_sigma=IO_SMOOTH_SIGMA, diffeomorphic=False,
                      int_steps=7, min_scale=IO_MIN_SCALE, progress=True, max_scale=IO_PAPER.max_scale,
                      level_features=IO_PAPER.level_features, sample_stride=IO_PAPER.sample_stride,
                      grid_step=IO_PAPER.grid_step, convex_init=IO_PAPER.convex_init,
                      convex_grid=IO_PAPER.convex_grid, convex_hw=IO_PAPER.convex_hw,
                      convex_coeffs=IO_PAPER.convex_coeffs, convex_ic_iters=IO_PAPER.convex_ic_iters,
                      convex_cost_smooth=IO_PAPER.convex_cost_smooth, **feature_kwargs) -> IOResult:
    """Register ``moving`` onto ``fixed`` (both (B, *vol, 1), 2-D or 3-D, intensities ~[0, 1]) by
    pyramid Adam instance optimisation of −cos(D_F, D_M∘φ) + w·‖∇u‖² (module docstring).

    ``lrs``, ``iters``, ``reg_weights``: one value per level (scalars broadcast), coarsest first.
    ``max_scale`` < 1: the finest level is that fraction of the size (displacement upsampled linearly at
    the end); ``level_features``: descriptors computed per level on the resampled images; ``sample_stride``
    s > 1: the similarity of each step on a random-phase sub-grid of 1/s^n of the voxels; ``convex_init``:
    start the first level from the coupled-convex discrete solution (cells of ``convex_grid`` voxels, labels
    ±``convex_hw`` cells, coupling weights ``convex_coeffs``, ``convex_ic_iters`` inverse-consistency
    iterations; module docstring).
    A named schedule: ``instance_optimise(f, m, **config.IO_PRESETS[name].schedule())``.
    ``feature_kwargs`` go to :func:`feature_provider` (dns_model, ae_models, moving_modality, ae_layers,
    mind_distance, mind_patch). ``progress``: tqdm bar. Returns :class:`IOResult`."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    fx = _as_batch(fixed, "fixed")
    ndim = fx.ndim - 2
    mv = _as_batch(moving, "moving", ndim)
    if fx.shape[:-1] != mv.shape[:-1]:
        raise ContraRegInputError(f"shape mismatch: fixed {fx.shape} vs moving {mv.shape} (B, *vol, C)")
    levels, lrs, iters, regw = check_schedule(levels, lrs, iters, reg_weights, smooth_sigma, int_steps)
    strides = _per_level(sample_stride, levels, "sample_stride", int)
    if any(s < 1 for s in strides) or not grid_step >= 1:
        raise ContraRegInputError(f"need sample_stride >= 1 and grid_step >= 1; got {strides}, {grid_step}")
    if convex_init:
        coeffs = [float(a) for a in np.atleast_1d(convex_coeffs)]
        if (int(convex_grid) < 1 or int(convex_hw) < 1 or min(int(convex_ic_iters), int(convex_cost_smooth)) < 0
                or not all(math.isfinite(a) and a >= 0 for a in coeffs)):
            raise ContraRegInputError(f"need convex_grid >= 1, convex_hw >= 1, convex_ic_iters >= 0, "
                                      f"convex_cost_smooth >= 0 and finite convex_coeffs >= 0; got {convex_grid}, "
                                      f"{convex_hw}, {convex_ic_iters}, {convex_cost_smooth}, {coeffs}")
        _check_cells(fx.shape[1:-1], convex_grid)
    vol = fx.shape[1:-1]
    shapes = level_shapes(vol, levels, min_scale, max_scale)

    t1 = time.perf_counter()
    maps, pooled = _feature_maps(features, fx, mv, smooth_sigma, shapes, int(convex_grid) if convex_init else 0,
                                 level_features, **feature_kwargs)
    t_feat = time.perf_counter() - t1
    bsz = fx.shape[0]
    param = tf.zeros((bsz, *shapes[0], ndim), tf.float32)   # normalised: resized freely between grids
    history = []
    t_convex = 0.0
    u_convex = None
    if convex_init:
        t2 = time.perf_counter()
        u_convex = convex_cells(*pooled, convex_hw, coeffs, int(convex_ic_iters),
                                int(convex_cost_smooth)) * float(convex_grid)
        param = _convex_param(u_convex, convex_grid, vol, _control_shape(shapes[0], grid_step))
        t_convex = time.perf_counter() - t2
        u_convex = u_convex.numpy()
    bar = tqdm(total=sum(iters), disable=not progress, desc="IO", leave=False)
    for lvl, shape in enumerate(shapes):
        pshape_l = _control_shape(shape, grid_step)
        if tuple(param.shape[1:-1]) != pshape_l:
            param = ops.resize_linear(param, pshape_l)
        t_lvl = time.perf_counter()
        ff, fm = maps[lvl]
        solver = _solver(bsz, shape, int(ff.shape[-1]), bool(diffeomorphic), int(int_steps), strides[lvl],
                         pshape_l)
        solver.reset(param, ff, fm, lrs[lvl], regw[lvl])
        rec = {"loss": [], "sim": [], "reg": []}
        for _ in range(iters[lvl]):
            try:
                terms = solver.step()
            except tf.errors.InvalidArgumentError as e:  # vxm's interpn on NaN/huge coordinates: diverged
                bar.close()
                raise RegistrationDiverged(
                    f"instance optimisation diverged at level {lvl} (the displacement left any sane range: "
                    f"{str(e).splitlines()[0][:120]}); likely cause: too high a learning rate (lrs {lrs}) or too "
                    f"low a regularisation weight (reg_weights {regw})") from None
            for k, v in zip(("loss", "sim", "reg"), terms):
                rec[k].append(v.numpy())
            bar.update(1)
        if iters[lvl]:
            bar.set_postfix(level=lvl, sim=float(np.mean(rec["sim"][-1])))
        history.append({"shape": shape, "grid": pshape_l, "lr": lrs[lvl], "iters": iters[lvl], "reg_weight": regw[lvl],
                        "seconds": time.perf_counter() - t_lvl,
                        **{k: (np.stack(v, axis=1) if v else np.zeros((bsz, 0), np.float32))
                           for k, v in rec.items()}})
        param = tf.identity(solver.var)
    bar.close()

    if not bool(tf.reduce_all(tf.math.is_finite(param))):
        raise RegistrationDiverged(f"instance optimisation diverged (NaN/Inf in the displacement); likely cause: "
                                   f"too high a learning rate (lrs {lrs}) or too low a regularisation weight "
                                   f"(reg_weights {regw})")
    if tuple(param.shape[1:-1]) != tuple(vol):
        param = ops.resize_linear(param, vol)
    v = param * tf.constant([(n - 1) / 2.0 for n in vol], tf.float32)
    inverse = velocity = None
    if diffeomorphic:
        u = ops.integrate(v, int(int_steps))
        inverse = ops.integrate(-v, int(int_steps)).numpy()
        velocity = v.numpy()
    else:
        u = v
    moved = ops.warp(tf.convert_to_tensor(mv), u).numpy()
    return IOResult(disp=u.numpy(), moved=moved, inverse=inverse, velocity=velocity, history=history,
                    level_shapes=shapes, seconds=time.perf_counter() - t0, feature_seconds=t_feat,
                    convex_seconds=t_convex, convex_disp=u_convex)


__all__ = ["instance_optimise", "check_schedule", "convex_init_fn", "convex_cells", "cost_volume", "coupled_convex",
           "inverse_consistent", "pool_features", "convex_offsets", "IOResult", "feature_provider", "ae_features",
           "level_shapes",
           "FEATURE_NAMES", "IO_LRS", "IO_ITERS",
           "IO_REG_WEIGHTS", "IO_LEVELS", "IO_SMOOTH_SIGMA", "IO_MIN_SCALE"]
