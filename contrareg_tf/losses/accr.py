"""ACCR: Anatomy-aware Cross-modal Contrastive Registration — the hypothetical method that the review of
contrastive learning for cross-modality registration (Sarpate & Jambhekar, §4 "Proposed Method") outlines in
five components without equations or settings. This module is **our reading** of components a–d as a
similarity trained jointly with the registration network (component e is the λ-conditioned VoxelMorph of
ContraReg, Dey et al. 2022; the review's three-stage pipeline is replaced by joint training from scratch, as
CoRe does). Every equation below is ours; defaults are in ``config.ACCRConfig``.

Notation: I1 = T1w of subject a (fixed of d12), I2 = T2w of subject b (fixed of d21), I2∘φ and I1∘φ⁻¹ the
moved images; L1, L2 the label maps of a and b (CerebrA on the built-in data).

a. **Dual encoders with shared early layers** (review §4 a): S = the first ``shared_layers`` Conv–ReLU blocks
   of ``widths`` (one set of weights); E1 = S then T1w-specific blocks then a 1×1 projection to C =
   ``feat_channels``; E2 the same with its own T2w-specific blocks (``networks.encoders``). Stride 1, so
   features live on the image grid. E1 encodes every T1w image (I1, I1∘φ⁻¹), E2 every T2w image (I2, I2∘φ).
   No batch normalisation by default (``norm``; ours): each pair's terms then do not depend on the rest of the
   batch; the features are L2-normalised (InfoNCE) or scale-free (self-similarity) anyway. With ``norm=True``
   the encoders always run in training mode (batch statistics of E1's [I1; I1∘φ⁻¹], E2's [I2; I2∘φ]): they
   exist only inside the loss, so their moving averages are never used.

Per direction, e.g. d12 with fixed features F = E1(I1) and moved features G = E2(I2∘φ) (d21: F = E2(I2),
G = E1(I1∘φ⁻¹)), n = min(``num_patches``, N) distinct locations x_1..x_n are drawn uniformly per sample (the
same for F and G, ``sampling.sample_locations``; d12's draw first, then d21's, from the one generator).

b. **Cross-modal attention** (review §4 b; ``networks.accr.CrossModalAttention``): scaled dot-product cross
   attention with learned 1×1 projections and a residual, one direction per modality,

       f_i ← f_i + [softmax_j(q(f_i)·k(g_j)/√d) v(g_j)] W_o,     g_i ← g_i + [softmax_j(q'(g_i)·k'(f_j)/√d) v'(f_j)] W'_o

   (f_i = F(x_i), g_i = G(x_i); the T1w-side direction refines the T1w features whichever is fixed). Full
   resolution attention is N×N (5120² per 2-D cpu-demo slice, 4.9·10⁶² at the paper's 3-D size), so the
   attention runs over **the n sampled locations only** (keys / values = the other modality's features at
   the same n locations): O(n²) independent of the image size. The refined features enter the contrastive
   loss; ``accr-noattn`` (the review's ablation "with vs without attention module") skips this step.
   Caveat (ours): the attended part of f_i is a function of the whole sampled set of the other image, not of
   G(x_i), so it does not depend on the alignment at x_i; only the residual carries the alignment signal.

c. **Anatomy-aware patch contrastive loss** (review §4 c), a masked InfoNCE with τ = ``tau`` on the
   L2-normalised (refined) features: query f_i, positive g_i (same location), negatives g_j of *other
   anatomical regions* only,

       ℓ_i = −log[ exp(f_i·g_i/τ) / ( exp(f_i·g_i/τ) + Σ_{j≠i, r_m(j) ≠ r_f(i)} exp(f_i·g_j/τ) ) ]
       NCE = mean_i ℓ_i                                                        (per sample)

   r_f(i) = L_fixed(x_i), the query's region on the fixed label map; r_m(j) = L_moving(x_j + u(x_j)) (nearest
   neighbour, ``ops.sample``), the region the *moved* feature g_j actually depicts: the moving subject's label
   map read through the same displacement u that warped the image (``pos_flow`` for d12, ``neg_flow`` for d21).
   Without the flow (``pos_flow``/``neg_flow`` None, e.g. ``BidirSimilarity.__call__``) r_m = r_f (the moved
   image is taken as aligned to the fixed one). Excluded logits are set to −1e9 (exp underflows to exactly
   0: −∞ in effect, ``nce.MASKED_LOGIT``). The background label 0 is a region like any other. A query
   with no admissible negative has ℓ_i = 0 and still counts in the mean. **Without label maps** in the batch
   (``labels1``/``labels2`` absent) the negatives fall back to every other sampled location (plain PatchNCE
   with one layer, j ≠ i) and a warning says so.

d. **Structural self-similarity** (review §4 d), MIND-like (Heinrich et al. 2012) on the feature maps, at
   full resolution: for the 2·ndim axis offsets r_k at distance δ = ``sss_distance`` (six-/four-neighbourhood,
   ``mind.neighbourhood``),

       D_k(x) = box_p[ mean_c (F_c(x) − F_c(x + r_k))² ],   V(x) = mean_k D_k(x)  (clamped, ``ops.clamp_variance``)
       S_k(F)(x) = exp(−(D_k(x) − min_j D_j(x)) / V(x))
       SSS(F, G) = mean_{x,k} |S_k(F)(x) − S_k(G)(x)|                          (per sample, L1 as MIND's loss)

   p = ``sss_patch``; replicate borders (``ops.replicate_shift``, ``ops.box_filter``). The mean over channels
   (instead of the sum) is immaterial: S is invariant to the scale of D. Computed on the encoder features
   (before attention, which exists at the sampled locations only).

Per direction and sample: **d12 = NCE(E1(I1), E2(I2∘φ)) + w · SSS(E1(I1), E2(I2∘φ))**, d21 likewise with
E2(I2), E1(I1∘φ⁻¹); w = ``ssim_weight``. L_sim = ½(d12 + d21) enters α(1−λ)·L_sim + λ·L_reg with α =
``ACCRConfig.alpha``. Gradients flow into both encoders, the attention block and (through the moved images
and the features) the registration network; nothing is detached. The encoders are only used by the loss:
a trained run's registration network is all that inference needs.

Cost (bench/bench_steps.py, cpu-demo 64×80, batch 2, 2 shared CPU cores, one run): 0.217 s/step = 4.7× the MI
step (0.046 s); the two full-resolution encoders (8 images per step, forward + backward) take most of it.
"""
import warnings

import numpy as np
import tensorflow as tf

from .. import config as _config
from .. import ops
from ..config import PAPER
from ..errors import ContraRegInputError
from ..networks.accr import CrossModalAttention
from ..networks.encoders import conv_blocks, feature_encoder
from .mind import neighbourhood
from .nce import paired_nce
from .sampling import sample_locations


# ------------------------------------------------------------------------------------------ loss pieces
def self_similarity(feats, distance=_config.ACCR.sss_distance, patch=_config.ACCR.sss_patch):
    """S(F): MIND-like self-similarity of a feature map (B, *vol, C) → (B, *vol, 2·ndim) (docstring, d)."""
    ndim = ops.spatial_ndim(feats)
    d = tf.concat([tf.reduce_mean(tf.square(feats - ops.replicate_shift(feats, o)), -1, keepdims=True)
                   for o in neighbourhood(ndim, int(distance))], axis=-1)
    d = ops.box_filter(d, int(patch))
    v = ops.clamp_variance(tf.reduce_mean(d, axis=-1, keepdims=True), range(1, ndim + 2))
    return tf.exp(-(d - tf.reduce_min(d, axis=-1, keepdims=True)) / v)


def structural_self_similarity(f_fixed, f_moved, distance=_config.ACCR.sss_distance,
                               patch=_config.ACCR.sss_patch):
    """SSS(F, G) = mean over voxels and neighbours of |S(F) − S(G)|: (B,)."""
    diff = tf.abs(self_similarity(f_fixed, distance, patch) - self_similarity(f_moved, distance, patch))
    return tf.reduce_mean(tf.reshape(diff, [tf.shape(diff)[0], -1]), axis=-1)


def allowed_negatives(region_q, region_k):
    """(B, n, n) bool: key j may be a negative of query i iff j ≠ i and region_k[j] ≠ region_q[i]."""
    region_q, region_k = tf.convert_to_tensor(region_q), tf.convert_to_tensor(region_k)
    other = tf.not_equal(region_q[:, :, None], region_k[:, None, :])
    n = tf.shape(region_q)[1]
    return tf.logical_and(other, tf.logical_not(tf.eye(n, dtype=tf.bool))[None])


def masked_nce(feats_q, feats_k, allowed, tau=_config.ACCR.tau):
    """Masked InfoNCE (docstring, c): row i of ``feats_k`` is the positive of query i, the keys j with
    ``allowed[b, i, j]`` its negatives. feats (B, n, D), unit vectors; returns (B,) = mean_i ℓ_i."""
    return tf.reduce_mean(paired_nce(feats_q, feats_k, allowed, tau), axis=-1)


def gather_points(x, idx):
    """x (B, *vol, C) at flat locations idx (B, n) → (B, n, C)."""
    return tf.gather(tf.reshape(x, [tf.shape(x)[0], -1, x.shape[-1]]), idx, batch_dims=1)


def point_coords(idx, shape):
    """Flat indices (B, n) of a grid of static ``shape`` → voxel coordinates (B, n, ndim) float32 (ij)."""
    coords, rem = [], idx
    for s in reversed(shape):
        coords.append(rem % s)
        rem = rem // s
    return tf.cast(tf.stack(coords[::-1], axis=-1), tf.float32)


def point_regions(labels, idx, flow=None):
    """Region index at the sampled locations: labels (B, *vol, 1) int read at x_i (``flow`` None) or at
    x_i + u(x_i) (nearest neighbour, border-clamped: ``ops.sample``) → (B, n) int32."""
    if flow is None:
        return tf.cast(gather_points(labels, idx)[..., 0], tf.int32)
    loc = point_coords(idx, labels.shape[1:-1].as_list()) + gather_points(tf.cast(flow, tf.float32), idx)
    lab = ops.sample(tf.cast(labels, tf.float32), loc, interp="nearest")
    return tf.cast(tf.round(lab[..., 0]), tf.int32)


# ------------------------------------------------------------------------------------------ the method
class ACCRSimilarity:
    """ACCR, a :class:`~contrareg_tf.losses.joint.JointSimilarity` (by structure): both directions, one object.

    ndim: 2 or 3; attention: with the cross-modal attention block (``accr``) or without (``accr-noattn``);
    params: an ``ACCRConfig``; rng: a ``tf.random.Generator`` (all location draws come from it; checkpoint it
    for an exact resume), an int (own generator from that seed) or None (TF's global RNG)."""

    def __init__(self, ndim, attention=True, params=None, rng=None, name="accr"):
        p = _config.ACCR if params is None else params
        ndim = int(ndim)
        if ndim not in (2, 3):
            raise ContraRegInputError(f"{name}: ndim must be 2 or 3, got {ndim}")
        if not 0 <= int(p.shared_layers) <= len(p.widths):
            raise ContraRegInputError(f"{name}: shared_layers={p.shared_layers} must be in 0..{len(p.widths)}")
        if int(p.num_patches) < 2 or not p.tau > 0 or p.ssim_weight < 0:
            raise ContraRegInputError(f"{name}: need num_patches >= 2, tau > 0, ssim_weight >= 0; got "
                                      f"{p.num_patches}, {p.tau}, {p.ssim_weight}")
        if not (rng is None or isinstance(rng, (int, np.integer, tf.random.Generator))):
            raise ContraRegInputError(f"{name}: rng must be None, an int or a tf.random.Generator, got {rng!r}")
        self.params, self.ndim, self.attention, self.name = p, ndim, bool(attention), name
        self.rng = tf.random.Generator.from_seed(int(rng)) if isinstance(rng, (int, np.integer)) else rng
        k = int(p.shared_layers)
        self.shared = conv_blocks(ndim, p.widths[:k], norm=p.norm, name=f"{name}_shared")
        self.enc1 = feature_encoder(ndim, p.widths[k:], p.feat_channels, norm=p.norm, shared=self.shared,
                                    name=f"{name}_enc1")
        self.enc2 = feature_encoder(ndim, p.widths[k:], p.feat_channels, norm=p.norm, shared=self.shared,
                                    name=f"{name}_enc2")
        self.attn = (CrossModalAttention(p.feat_channels, p.attn_channels, name=f"{name}_attn")
                     if self.attention else None)
        self._warned = False

    # -- protocol
    @property
    def trainable_variables(self):
        seen, out = set(), []
        mods = [self.enc1, self.enc2] + ([self.attn] if self.attn is not None else [])
        for v in (v for m in mods for v in m.trainable_variables):
            if v.ref() not in seen:
                seen.add(v.ref())
                out.append(v)
        return out

    def checkpoint_items(self):
        items = {f"{self.name}_enc1": self.enc1, f"{self.name}_enc2": self.enc2}
        if self.attn is not None:
            items[f"{self.name}_attn"] = self.attn
        return items

    def pair_terms(self, batch, moved2, moved1, pos_flow=None, neg_flow=None):
        return self.terms(batch, moved2, moved1, pos_flow, neg_flow)[:2]

    # -- computation
    def _image(self, x, arg):
        return tf.cast(ops.check_image(x, f"{self.name}: {arg}", channels=1, ndim=self.ndim, finite=False),
                       tf.float32)

    def terms(self, batch, moved2, moved1, pos_flow=None, neg_flow=None):
        """(d12, d21, details): details = dict of the parts per direction (``nce``, ``sss`` (B,) each as
        (d12's, d21's)), the sampled ``idx`` and the ``allowed`` negative masks."""
        p = self.params
        i1, i2 = self._image(batch["img1"], "img1"), self._image(batch["img2"], "img2")
        m2, m1 = self._image(moved2, "moved2"), self._image(moved1, "moved1")
        shape = i1.shape[1:-1].as_list()
        if None in shape or any(x.shape[1:-1].as_list() != shape for x in (i2, m2, m1)):
            raise ContraRegInputError(f"{self.name}: img1, img2, moved2, moved1 need one static spatial shape, "
                                      f"got {i1.shape}, {i2.shape}, {m2.shape}, {m1.shape}")
        b = tf.shape(i1)[0]
        # E1 on every T1w image, E2 on every T2w image (one call each)
        f1 = self.enc1(tf.concat([i1, m1], 0), training=True)
        f2 = self.enc2(tf.concat([i2, m2], 0), training=True)
        f1_fix, f1_mov = f1[:b], f1[b:]
        f2_fix, f2_mov = f2[:b], f2[b:]
        # d: structural self-similarity, both directions in one call (fixed = [F1(I1); F2(I2)])
        sss = structural_self_similarity(tf.concat([f1_fix, f2_fix], 0), tf.concat([f2_mov, f1_mov], 0),
                                         p.sss_distance, p.sss_patch)
        sss12, sss21 = sss[:b], sss[b:]
        # sampled locations: d12's draw, then d21's
        everywhere = tf.ones(tf.stack([b, int(np.prod(shape))]), tf.bool)
        idx12, _ = sample_locations(everywhere, p.num_patches, self.rng)
        idx21, _ = sample_locations(everywhere, p.num_patches, self.rng)
        q12, k12 = gather_points(f1_fix, idx12), gather_points(f2_mov, idx12)      # T1w query, T2w keys
        q21, k21 = gather_points(f2_fix, idx21), gather_points(f1_mov, idx21)      # T2w query, T1w keys
        if self.attn is not None:   # b: T1w sets [q12; k21] and T2w sets [k12; q21] refined together
            r1, r2 = self.attn(tf.concat([q12, k21], 0), tf.concat([k12, q21], 0))
            q12, k21, k12, q21 = r1[:b], r1[b:], r2[:b], r2[b:]
        # c: anatomy-aware negatives
        allowed12, allowed21 = self._allowed(batch, idx12, idx21, pos_flow, neg_flow)
        nce = masked_nce(ops.l2_normalize(tf.concat([q12, q21], 0)), ops.l2_normalize(tf.concat([k12, k21], 0)),
                         tf.concat([allowed12, allowed21], 0), p.tau)
        nce12, nce21 = nce[:b], nce[b:]
        w = float(p.ssim_weight)
        details = dict(nce=(nce12, nce21), sss=(sss12, sss21), idx=(idx12, idx21), allowed=(allowed12, allowed21))
        return nce12 + w * sss12, nce21 + w * sss21, details

    def _allowed(self, batch, idx12, idx21, pos_flow, neg_flow):
        l1, l2 = batch.get("labels1"), batch.get("labels2")
        if l1 is None or l2 is None:
            if not self._warned:
                warnings.warn(f"{self.name}: the batch has no label maps (labels1/labels2); the negatives are "
                              f"every other sampled location (plain PatchNCE), not anatomy-aware", stacklevel=3)
                self._warned = True
            everyone = tf.zeros_like(idx12)
            return allowed_negatives(everyone, everyone + 1), allowed_negatives(everyone, everyone + 1)
        l1, l2 = tf.convert_to_tensor(l1), tf.convert_to_tensor(l2)
        if l1.shape.rank != self.ndim + 2 or l2.shape.rank != self.ndim + 2:
            raise ContraRegInputError(f"{self.name}: labels1/labels2 must be (B, *vol, 1), got {l1.shape}, {l2.shape}")
        rq12, rq21 = point_regions(l1, idx12), point_regions(l2, idx21)              # fixed label maps
        rk12 = rq12 if pos_flow is None else point_regions(l2, idx12, pos_flow)        # L2 read through φ
        rk21 = rq21 if neg_flow is None else point_regions(l1, idx21, neg_flow)        # L1 read through φ⁻¹
        return allowed_negatives(rq12, rk12), allowed_negatives(rq21, rk21)


def build_accr(cfg=PAPER, attention=True, rng=None, params=None):
    """The ACCR similarity for ``cfg``'s spatial rank (``len(cfg.inshape)``); params default ``config.ACCR``."""
    return ACCRSimilarity(len(cfg.inshape), attention=attention, params=params, rng=rng,
                          name="accr" if attention else "accr_noattn")


__all__ = ["ACCRSimilarity", "build_accr", "self_similarity", "structural_self_similarity", "allowed_negatives",
           "masked_nce", "point_regions"]
