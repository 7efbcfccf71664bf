"""CoRe (Kats et al., "CoRe: Joint Optimization with Contrastive Learning for Medical Image Registration") as a
jointly trained similarity for the λ-conditioned network (``--loss core``; the ``JointSimilarity`` protocol of
``joint.py``), adapted to T1w ↔ T2w inter-subject registration.

Equivariance InfoNCE (CoRe §2.3, eq. 3, after SimCLR's NT-Xent). For an image x and a random affine A from the
augmentation set, z_i = E(A(x))_i and z'_i = A(E(x))_i at N sampled locations i (the *same* affine warp applied
to the feature map of the original image); u_i = z_i / ‖z_i‖, v_i = z'_i / ‖z'_i‖, s(a, b) = ⟨a, b⟩ / τ. Each
vector has one positive (its partner at the same location) and 2(N−1) negatives (the other sampled vectors of
*both* maps)::

    ℓ(u_i) = −log  exp(s(u_i, v_i)) / [ Σ_k exp(s(u_i, v_k)) + Σ_{k≠i} exp(s(u_i, u_k)) ]      (ℓ(v_i) alike)
    L_eq(E, x) = 1/(2N) Σ_i [ ℓ(u_i) + ℓ(v_i) ]          τ = 0.1, N = 1,000 (paper)

Joint loss (CoRe §2.4, eq. 4: L = L_reg + γ·L_eq, γ = 1) becomes, per direction, with one encoder per modality
(E1 for T1w, E2 for T2w) and D the feature dissimilarity over the foreground Ω (fixed ∪ moved > FOREGROUND_LEVEL)::

    d12 = 1 − mean_Ω cos( sg[E1(I1)], E2(I2∘φ) ) + γ · L_eq(E1, I1)
    d21 = 1 − mean_Ω cos( sg[E2(I2)], E1(I1∘φ⁻¹) ) + γ · L_eq(E2, I2)

so L_sim = ½(d12 + d21) carries ½γ(L_eq(E1) + L_eq(E2)), and the network trains on α(1−λ)·L_sim + λ·L_reg
(the contrastive term is weighted by α(1−λ) with the rest of L_sim; α = ``config.CORE.alpha``).

Choices (the paper's pipeline differs: features feed a discrete differentiable optimiser trained on
pseudo-label displacements by MSE; here the registration signal is the feature similarity itself):

- **One encoder per modality** (``shared_encoder=False``): T1w and T2w differ in contrast, so each gets its own
  ``networks.encoders.feature_encoder`` (the paper's four Conv-BN-ReLU blocks, stride 1 here so features stay on
  the image grid, + 1×1 projection to 16 channels). ``shared_encoder=True`` uses one for both.
- **Cosine, not MSE**, for D: MSE of unconstrained features is minimised by shrinking them; cosine is
  scale-free. A similarity between two trainable encoders can collapse to a constant (D = 0 for every warp);
  the equivariance InfoNCE, which needs negatives to differ, is what prevents that.
- **Stop-gradient on the fixed side** of D (SimSiam-style, symmetric over the two directions): each encoder
  learns from D only as the moved-side encoder, matching the other modality's current features, so the two
  cannot drift together towards a constant in one step; E1 still gets D's gradient through d21, E2 through d12.
- **InfoNCE on the features D compares** (the 16-channel projection), not on the final block's convolution
  output as in the paper: there the projection feeds an optimiser trained on pseudo-labels, here D pulls the
  projection towards a constant and only a contrastive term on the *same* features stops it. Measured (cpu-demo,
  300 iterations; D of two subjects' own, aligned T1w / T2w, the T2w rolled by 0/1/2/4/8 voxels): InfoNCE on the last block, D = 0.016,
  0.017, 0.020, 0.047, 0.106 (collapsed, flat near alignment), Dice +0.006 over no registration; InfoNCE on the
  projection, D = 0.740, 0.816, 0.899, 0.973, 0.991, Dice +0.014 (MI, same iterations: +0.025).
- **Augmentation set** (not stated in the paper): per sample x ↦ x(T(p)), T(p) = R·S·H (p − c) + c + t with
  R = expm(skew) rotation angles ± ``rot_deg`` per plane, S = 1 ± ``scale`` per axis, H = I + strict upper
  shear ± ``shear``, t = ± ``translate`` × axis length; images and features warped linearly (``ops.warp``).
  Locations are drawn (``sampling.sample_locations``) only where T(p) lies inside the grid (interior, no border
  clamping) and A(x) is foreground (background voxels have identical features and could not be told apart);
  when fewer than N qualify the rest are excluded. N is capped at the number of voxels (tiny presets).
  Random numbers come from the training ``tf.random.Generator`` (checkpointed: exact resume).
- The InfoNCE is applied to the fixed (unwarped) input images I1 and I2 (data, no gradient to the network).
- BatchNorm runs in training mode (``pair_terms`` is only used while training), over the batch of the three
  images each encoder sees (fixed, its augmented copy, the other direction's moved image) in one call.
"""
import math

import tensorflow as tf
import voxelmorph as vxm

from .. import ops
from ..config import CORE, FOREGROUND_LEVEL, PAPER
from ..networks.encoders import feature_encoder
from .nce import nce_terms, valid_mean
from .sampling import sample_locations


def infonce(u, v, valid=None, tau=CORE.tau):
    """Eq. 3 on gathered vectors u, v (B, N, C) (normalised here); valid (B, N) bool → (B,) mean over the
    2·(valid) anchors; invalid vectors are neither anchors nor negatives."""
    n = tf.shape(u)[1]
    valid = tf.ones(tf.shape(u)[:2], tf.bool) if valid is None else tf.cast(valid, tf.bool)
    w = tf.concat([u, v], 1)
    w = ops.l2_normalize(w)
    logits = tf.einsum("bic,bjc->bij", w, w) / tau                          # (B, 2N, 2N)
    vv = tf.concat([valid, valid], 1)
    keep = tf.logical_and(vv[:, None, :], ~tf.eye(2 * n, dtype=tf.bool)[None])
    pos = tf.reduce_sum(w * tf.roll(w, n, axis=1), -1) / tau              # partner of i is i ± N
    return valid_mean(nce_terms(logits, pos, keep), vv)


def random_affine(rng, batch, shape, cfg=CORE):
    """(B, n, n+1) affines about the grid centre (``vxm.utils.affine_to_dense_shift``, shift_center) drawn
    from ``rng``: the augmentation set of the module docstring."""
    n = len(shape)
    upper = lambda m: tf.linalg.band_part(m, 0, -1) - tf.linalg.band_part(m, 0, 0)
    a = upper(rng.uniform((batch, n, n), -1.0, 1.0)) * (cfg.rot_deg * math.pi / 180.0)
    h = upper(rng.uniform((batch, n, n), -1.0, 1.0)) * cfg.shear
    s = 1.0 + cfg.scale * rng.uniform((batch, n), -1.0, 1.0)
    t = cfg.translate * rng.uniform((batch, n), -1.0, 1.0) * tf.constant(shape, tf.float32)
    m = tf.linalg.expm(a - tf.linalg.matrix_transpose(a)) @ tf.linalg.diag(s) @ (tf.eye(n) + h)
    return tf.concat([m, t[..., None]], -1)


def dense_shift(matrix, shape):
    """(B, n, n+1) affines → (B, *shape, n) voxel shifts (voxelmorph, ij, centred)."""
    return tf.stack([vxm.utils.affine_to_dense_shift(matrix[b], list(shape)) for b in range(matrix.shape[0])])


def equivariance_infonce(feat_aug, feat, shift, mask=None, num_samples=CORE.num_samples, tau=CORE.tau,
                         seed=None, return_idx=False):
    """L_eq (B,) from feat_aug = E(A(x)), feat = E(x) (B, *vol, C) and A's dense shift (B, *vol, n): feat is
    warped by the shift (A(E(x))), locations are drawn where x∘T is interior (and ``mask`` (B, *vol), if
    given, is set)."""
    vol = feat.shape[1:-1]
    loc = shift + tf.cast(tf.stack(tf.meshgrid(*[tf.range(s) for s in vol], indexing="ij"), -1), shift.dtype)
    ok = tf.reduce_all((loc >= 0.0) & (loc <= tf.constant([s - 1 for s in vol], loc.dtype)), -1)
    if mask is not None:
        ok = ok & tf.cast(mask, tf.bool)
    flat = lambda x: tf.reshape(x, [x.shape[0], -1, x.shape[-1]])
    idx, valid = sample_locations(tf.reshape(ok, [ok.shape[0], -1]), num_samples, seed)
    u = tf.gather(flat(feat_aug), idx, batch_dims=1)
    v = tf.gather(flat(ops.warp(feat, shift)), idx, batch_dims=1)
    loss = infonce(u, v, valid, tau)
    return (loss, idx, valid) if return_idx else loss


class CoRe:
    """The ``JointSimilarity`` object of ``--loss core`` (module docstring)."""

    def __init__(self, ndim, cfg=CORE, rng=None, seed=PAPER.seed):
        self.cfg, self.rng = cfg, rng if rng is not None else tf.random.Generator.from_seed(seed)
        names = ("core_enc",) if cfg.shared_encoder else ("core_enc1", "core_enc2")
        self.encoders = {k: feature_encoder(ndim, cfg.widths, cfg.feat_channels, name=k) for k in names}
        self._enc = list(self.encoders.values()) * (3 - len(names))      # [E1, E2]

    @property
    def trainable_variables(self):
        return [v for e in self.encoders.values() for v in e.trainable_variables]

    def checkpoint_items(self):
        return dict(self.encoders)

    def _encode(self, enc, fixed, moved):
        """One BatchNorm batch: (proj(fixed), L_eq(fixed), proj(moved))."""
        b, vol = int(fixed.shape[0]), [int(s) for s in fixed.shape[1:-1]]
        shift = dense_shift(random_affine(self.rng, b, vol, self.cfg), vol)
        aug = ops.warp(fixed, shift)
        proj = enc(tf.concat([fixed, aug, moved], 0), training=True)
        mask = aug[..., 0] > FOREGROUND_LEVEL
        l_eq = equivariance_infonce(proj[b:2 * b], proj[:b], shift, mask, self.cfg.num_samples, self.cfg.tau,
                                    self.rng)
        return proj[:b], l_eq, proj[2 * b:]

    @staticmethod
    def _dissim(fixed_img, moved_img, f_fixed, f_moved):
        w = tf.cast((fixed_img > FOREGROUND_LEVEL) | (moved_img > FOREGROUND_LEVEL), tf.float32)[..., 0]
        cos = ops.cosine(tf.stop_gradient(f_fixed), f_moved)
        axes = list(range(1, cos.shape.rank))
        return 1.0 - tf.reduce_sum(w * cos, axes) / tf.maximum(tf.reduce_sum(w, axes), 1.0)

    def pair_terms(self, batch, moved2, moved1, pos_flow=None, neg_flow=None):
        i1, i2 = batch["img1"], batch["img2"]
        f1, eq1, f_moved1 = self._encode(self._enc[0], i1, moved1)
        f2, eq2, f_moved2 = self._encode(self._enc[1], i2, moved2)
        g = self.cfg.equiv_weight
        return (self._dissim(i1, moved2, f1, f_moved2) + g * eq1,
                self._dissim(i2, moved1, f2, f_moved1) + g * eq2)


def build_core(cfg=PAPER, rng=None, core=CORE):
    """The registry's builder: ``cfg`` = the run's ``Config`` (spatial rank, seed), ``rng`` its generator."""
    return CoRe(len(cfg.inshape), core, rng=rng, seed=cfg.seed)
