"""Instance optimisation (IO) registration with structural descriptors (DNS paper, CVPR 2024, §3.4 and
supplementary B.1 / Table 4 — Mok et al., *Modality-Agnostic Structural Image Representation Learning
for Deformable Multi-Modality Medical Image Registration*).

    φ* = argmin_φ  −cos( ψ_σ(D_F), ψ_σ(D_M) ∘ φ ) + λ_reg · ‖∇u‖²,   φ(x) = x + u(x)

* Descriptors D_F, D_M (MIND-SSC, MIND, DNS or the ContraReg autoencoder features): ``features.py`` —
  computed once at full size, ψ_σ-smoothed, resampled to each level; the optional coupled-convex start:
  ``convex.py``.
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
* A batch of B pairs is optimised jointly with the loss summed over the batch (Adam is element-wise, so
  each pair follows the same path as alone). The inner Adam step is a ``tf.function``; the per-level
  variable / optimiser / traced step are cached by (B, shape, channels, parameterisation), so registering
  many pairs of one size traces once.
* The deformable stage is kept or dropped per pair by ``IOConfig.deformable`` (``decision.py``): 'on' keeps it,
  'off' skips it (the identity: the affine / world-space pre-alignment alone), 'auto' keeps it only when it
  lowers its own data term beyond noise (the rule and its measured noise level are in ``decision.py``).
"""
import collections
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from .. import ops
from ..config import IO_PAPER, IOConfig
from ..errors import ContraRegInputError, RegistrationDiverged
from ..progress import phase, say
from .convex import check_convex, convex_start
from .decision import DEFORMABLE_MODES, cosine_dissimilarity, data_term, keep_deformable
from .features import FeatureSpec, as_spec, feature_maps

# the DNS paper's Table-4 schedule (config.IOConfig holds the values)
IO_LEVELS, IO_LRS, IO_ITERS = IO_PAPER.levels, IO_PAPER.lrs, IO_PAPER.iters
IO_REG_WEIGHTS, IO_SMOOTH_SIGMA, IO_MIN_SCALE = IO_PAPER.reg_weights, IO_PAPER.smooth_sigma, IO_PAPER.min_scale


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
    similarity_identity: Optional[np.ndarray] = None  # (B,) data term at u = 0 (finest level, every voxel)
    similarity_deformable: Optional[np.ndarray] = None  # (B,) data term at the optimised u (same grid)
    deformable_kept: Optional[np.ndarray] = None  # (B,) bool: the deformable stage is in disp (decision.py)

    @property
    def final_similarity(self):
        """(B,) data term (1 − mean cosine, every voxel of the finest level) of the returned displacement."""
        if self.deformable_kept is None:
            return None
        return np.where(self.deformable_kept, self.similarity_deformable, self.similarity_identity)


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


def _control_shape(shape, grid_step):
    """The control grid of a level of ``shape``: ``grid_step`` voxels per control point, at least 2 per axis."""
    return tuple(max(2, int(round(n / grid_step))) for n in shape)



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
            return cosine_dissimilarity(self.ff, ops.warp(self.fm, self.dense(u)))
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
        return cosine_dissimilarity(sub(self.ff), ops.sample(self.fm, sub(self.grid) + u * self.up))

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


def check_io(schedule: IOConfig, vol=None):
    """Validate every setting of ``schedule`` (and, given the volume shape ``vol``, those that depend on it)
    before anything is computed: the per-level schedule (``check_schedule``), ``sample_stride`` >= 1,
    ``grid_step`` >= 1, ``deformable`` in ('auto', 'on', 'off'), a finite ``deformable_min_gain`` >= 0, the convex
    start's settings, and a ψ_σ no wider than the image. Returns ``(levels, lrs, iters, reg_weights, strides)``."""
    levels, lrs, iters, regw = check_schedule(schedule.levels, schedule.lrs, schedule.iters, schedule.reg_weights,
                                              schedule.smooth_sigma, schedule.int_steps)
    strides = _per_level(schedule.sample_stride, levels, "sample_stride", int)
    if any(s < 1 for s in strides) or not schedule.grid_step >= 1:
        raise ContraRegInputError(f"need sample_stride >= 1 and grid_step >= 1; got {strides}, {schedule.grid_step}")
    if schedule.deformable not in DEFORMABLE_MODES:
        raise ContraRegInputError(f"deformable must be one of {', '.join(DEFORMABLE_MODES)}, got {schedule.deformable!r}")
    if not (math.isfinite(schedule.deformable_min_gain) and schedule.deformable_min_gain >= 0):
        raise ContraRegInputError(f"deformable_min_gain must be a finite number >= 0, got "
                                  f"{schedule.deformable_min_gain}")
    if vol is not None:
        if schedule.smooth_sigma and schedule.smooth_sigma > max(vol):
            raise ContraRegInputError(f"smooth_sigma {schedule.smooth_sigma:g} voxels is wider than the image "
                                      f"{tuple(int(n) for n in vol)}; use at most {max(vol)} (0 = no smoothing)")
        if schedule.convex_init:
            check_convex(schedule, vol)
    return levels, lrs, iters, regw, strides


def _identity_result(fx, mv, schedule, t0):
    """The result of ``deformable='off'``: u = 0 (no descriptors computed, nothing optimised)."""
    zeros = np.zeros(fx.shape[:-1] + (fx.ndim - 2,), np.float32)
    nan = np.full(fx.shape[0], np.nan, np.float32)
    return IOResult(disp=zeros, moved=mv.copy(), inverse=zeros if schedule.diffeomorphic else None,
                    velocity=zeros if schedule.diffeomorphic else None, seconds=time.perf_counter() - t0,
                    similarity_identity=nan, similarity_deformable=nan,
                    deformable_kept=np.zeros(fx.shape[0], bool))


def instance_optimise(fixed, moving, features="mindssc", schedule: IOConfig = IO_PAPER,
                      progress=True) -> IOResult:
    """Register ``moving`` onto ``fixed`` (both (B, *vol, 1), 2-D or 3-D, intensities ~[0, 1]) by
    pyramid Adam instance optimisation of −cos(D_F, D_M∘φ) + w·‖∇u‖² (module docstring).

    ``features``: a name of ``FEATURE_NAMES``, a :class:`FeatureSpec` (the descriptor's models and options), a
    callable used for both images or a pair of callables (fixed, moving). ``schedule``: an ``IOConfig``
    (``config.IO_PRESETS[name]``, or ``dataclasses.replace`` of one): per level (scalars broadcast, coarsest
    first) ``lrs``, ``iters``, ``reg_weights``; ``max_scale`` < 1: the finest level is that fraction of the size
    (displacement upsampled linearly at the end); ``level_features``: descriptors computed per level on the
    resampled images; ``sample_stride`` s > 1: the similarity of each step on a random-phase sub-grid of 1/s^n
    of the voxels; ``convex_init``: the coupled-convex start (``convex.py``); ``diffeomorphic`` / ``int_steps``:
    an SVF integrated by scaling and squaring; ``deformable`` / ``deformable_min_gain``: whether the result
    keeps the deformable stage (``decision.py``). ``progress``: a tqdm bar and one line per phase (descriptors,
    convex start, optimisation, the decision) with its time (``contrareg_tf.progress``, on stderr). Returns
    :class:`IOResult`."""
    t0 = time.perf_counter()
    step = phase if progress else (lambda text: contextlib.nullcontext())
    note = say if progress else (lambda text: None)
    fx = _as_batch(fixed, "fixed")
    ndim = fx.ndim - 2
    mv = _as_batch(moving, "moving", ndim)
    if fx.shape[:-1] != mv.shape[:-1]:
        raise ContraRegInputError(f"shape mismatch: fixed {fx.shape} vs moving {mv.shape} (B, *vol, C)")
    vol = fx.shape[1:-1]
    levels, lrs, iters, regw, strides = check_io(schedule, vol)
    if schedule.deformable == "off":
        note("deformable stage: off (the pre-aligned result)")
        return _identity_result(fx, mv, schedule, t0)
    shapes = level_shapes(vol, levels, schedule.min_scale, schedule.max_scale)
    spec = as_spec(features)
    int_steps = int(schedule.int_steps)

    t1 = time.perf_counter()
    with step(f"descriptors ({spec.name if isinstance(spec, FeatureSpec) else 'callable'}, "
              f"{len(shapes)} level(s))"):
        maps, pooled = feature_maps(spec, fx, mv, schedule.smooth_sigma, shapes,
                                    int(schedule.convex_grid) if schedule.convex_init else 0, schedule.level_features)
    t_feat = time.perf_counter() - t1
    bsz = fx.shape[0]
    param = tf.zeros((bsz, *shapes[0], ndim), tf.float32)   # normalised: resized freely between grids
    history = []
    t_convex = 0.0
    u_convex = None
    if schedule.convex_init:
        t2 = time.perf_counter()
        with step(f"convex start ({schedule.convex_grid}-voxel cells, ±{schedule.convex_hw} cells)"):
            param, u_convex = convex_start(pooled, schedule, vol, _control_shape(shapes[0], schedule.grid_step))
            u_convex = u_convex.numpy()
        t_convex = time.perf_counter() - t2
    note(f"optimisation: {' + '.join(str(i) for i in iters)} Adam steps on "
         f"{', '.join('x'.join(map(str, sh)) for sh in shapes)}")
    t3 = time.perf_counter()
    bar = tqdm(total=sum(iters), disable=not progress, desc="IO", leave=False)
    for lvl, shape in enumerate(shapes):
        pshape_l = _control_shape(shape, schedule.grid_step)
        if tuple(param.shape[1:-1]) != pshape_l:
            param = ops.resize_linear(param, pshape_l)
        t_lvl = time.perf_counter()
        ff, fm = maps[lvl]
        solver = _solver(bsz, shape, int(ff.shape[-1]), bool(schedule.diffeomorphic), int_steps, strides[lvl],
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
    note(f"optimisation done: {time.perf_counter() - t3:.1f} s")

    if not bool(tf.reduce_all(tf.math.is_finite(param))):
        raise RegistrationDiverged(f"instance optimisation diverged (NaN/Inf in the displacement); likely cause: "
                                   f"too high a learning rate (lrs {lrs}) or too low a regularisation weight "
                                   f"(reg_weights {regw})")
    s_id = data_term(*maps[-1], None)
    s_def = data_term(*maps[-1], solver.dense(solver.disp(param)))
    kept = keep_deformable(s_id, s_def, schedule.deformable, schedule.deformable_min_gain)
    note("deformable stage: " + "; ".join(
        f"{'kept' if k else 'dropped'} (data term {a:.4f} -> {b:.4f}, {schedule.deformable})"
        for k, a, b in zip(kept, s_id, s_def)))
    if not kept.all():
        param = param * tf.constant(kept.astype(np.float32).reshape((bsz,) + (1,) * (ndim + 1)))
    if tuple(param.shape[1:-1]) != tuple(vol):
        param = ops.resize_linear(param, vol)
    v = param * tf.constant([(n - 1) / 2.0 for n in vol], tf.float32)
    inverse = velocity = None
    if schedule.diffeomorphic:
        u = ops.integrate(v, int_steps)
        inverse = ops.integrate(-v, int_steps).numpy()
        velocity = v.numpy()
    else:
        u = v
    moved = ops.warp(tf.convert_to_tensor(mv), u).numpy()
    return IOResult(disp=u.numpy(), moved=moved, inverse=inverse, velocity=velocity, history=history,
                    level_shapes=shapes, seconds=time.perf_counter() - t0, feature_seconds=t_feat,
                    convex_seconds=t_convex, convex_disp=u_convex, similarity_identity=s_id,
                    similarity_deformable=s_def, deformable_kept=kept)
