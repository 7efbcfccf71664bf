"""PatchNCE similarity for multi-modality registration (ContraReg §2, after CUT's PatchNCE).

For layers k = 1..L of two frozen autoencoders A1 (query modality) and A2 (moved modality), projected by
trainable heads F1^k, F2^k onto the unit hypersphere, at ns locations i sampled per layer and per sample
(the *same* indices on both sides)::

    f_i = F1^k(A1^k(I1)_i),   f_i+ = F2^k(A2^k(I2∘φ)_i),   f_j- = F2^k(A2^k(I2∘φ)_j),  j ≠ i sampled

    ℓ_i^k = −log[ exp(f_i·f_i+ / τ) / ( exp(f_i·f_i+ / τ) + Σ_{j≠i} exp(f_i·f_j- / τ) ) ]

    d12(I1 ‖ I2∘φ) = Σ_k  mean_{i valid} ℓ_i^k          (per sample, shape (B,))

Normalisation (the paper leaves it open): **mean over the sampled valid locations, sum over layers**.
j = i is *excluded* from the negatives, as in the paper's equation (CUT fills the diagonal with −10; the
two agree to e^(−9/τ)). Differences to CUT: the moved (key) side is **not** detached — the warp is what is
learned — and the autoencoders are frozen (``trainable=False``) while the heads train with the
registration network.

Variants: ``masked=True`` (mCR) samples only inside the union of the two foreground masks, max-pooled to
each layer's resolution; ExtNegs appends ns features of an external image (moved modality, another
subject) as extra negatives; RandAE = randomly initialised frozen autoencoders passed in (nothing else).
Static shapes with variable foreground counts: top-k over (random score + bonus on foreground) and a
``valid`` flag per pick; invalid picks are neither queries nor negatives.

``L_sim = ½ (d12(I1 ‖ I2∘φ) + d21(I2 ‖ I1∘φ⁻¹))`` is :func:`bidirectional_patchnce`; voxelmorph users
pass ``PatchNCE(A1, F1, A2, F2).loss`` and ``PatchNCE(A2, F2, A1, F1).loss`` to ``compile`` and wrap the model
with :func:`attach_heads` so that ``fit`` trains the heads too.
"""
import numpy as np
import tensorflow as tf

from .. import ops
from ..config import FOREGROUND_LEVEL, PAPER
from ..errors import ContraRegInputError

DEFAULT_MASK_THRESHOLD = FOREGROUND_LEVEL   # foreground = intensity > 5% of the [0, 1] range (not in paper)
_NEG = -1e9                     # logit of an excluded negative (exp → 0 exactly)


# ----------------------------------------------------------------------------------------------- sampling
def _uniform(shape, seed):
    """U[0,1) from ``seed``: None (global RNG), int / (int, int) (stateless) or a tf.random.Generator."""
    if seed is None:
        return tf.random.uniform(shape)
    if isinstance(seed, tf.random.Generator):
        return seed.uniform(shape)
    s = [int(seed), 0] if np.ndim(seed) == 0 else [int(v) for v in seed]
    return tf.random.stateless_uniform(shape, seed=s)


def sample_locations(mask, num_patches=PAPER.num_patches, seed=None):
    """Sample min(ns, N) distinct flat locations per sample, foreground first.

    mask: (B, N) bool/numeric, nonzero = may be sampled (pass all-ones for CR).
    Returns ``idx`` (B, n) int32 and ``valid`` (B, n) bool (False where the pick fell on background
    because the sample has fewer than n foreground locations).
    """
    mask = tf.cast(mask, tf.bool)
    n_loc = mask.shape[-1]
    k = min(int(num_patches), n_loc) if n_loc is not None else tf.minimum(num_patches, tf.shape(mask)[-1])
    scores = _uniform(tf.shape(mask), seed) + 2.0 * tf.cast(mask, tf.float32)
    idx = tf.math.top_k(scores, k=k, sorted=False).indices
    return idx, tf.gather(mask, idx, batch_dims=1)


def resize_mask(mask, spatial_shape):
    """Binary mask (B, *vol[, 1]) → (B, *spatial_shape) bool at a feature map's resolution.

    Integer down-factors: max-pool (a feature location is foreground if its block touches the foreground);
    otherwise nearest neighbour.
    """
    mask = tf.cast(mask, tf.float32)
    ndim = len(spatial_shape)
    if mask.shape.rank == ndim + 1:
        mask = mask[..., None]
    vol = mask.shape[1:-1].as_list()
    if list(vol) == list(spatial_shape):
        return mask[..., 0] > 0
    if all(v % s == 0 for v, s in zip(vol, spatial_shape)):
        f = [v // s for v, s in zip(vol, spatial_shape)]
        return tf.nn.max_pool(mask, ksize=f, strides=f, padding="VALID")[..., 0] > 0
    for d, (v, s) in enumerate(zip(vol, spatial_shape)):
        mask = tf.gather(mask, np.floor((np.arange(s) + 0.5) * v / s).astype(np.int32), axis=d + 1)
    return mask[..., 0] > 0


# ------------------------------------------------------------------------------------------- core loss
def patchnce(feats_q, feats_k, valid=None, tau=PAPER.nce_tau, feats_ext=None, valid_ext=None):
    """PatchNCE on already-projected unit vectors (the equation in the module docstring, one layer).

    feats_q, feats_k: (B, n, D) queries f_i and keys f_i+ (row i of keys is the positive of query i, the
    other rows are its negatives). valid: (B, n) bool or None (all valid). feats_ext: (B, m, D) extra
    negatives for every query (ExtNegs), valid_ext: (B, m). Returns (B,): mean over valid queries
    (0 where a sample has none).
    """
    n = tf.shape(feats_q)[1]
    if valid is None:
        valid = tf.ones(tf.shape(feats_q)[:2], tf.bool)
    valid = tf.cast(valid, tf.bool)
    logits = tf.einsum("bid,bjd->bij", feats_q, feats_k) / tau                  # (B, n, n); diag = positives
    pos = tf.linalg.diag_part(logits)                                           # f_i · f_i+ / τ
    keep = tf.logical_or(tf.eye(n, dtype=tf.bool)[None], valid[:, None, :])  # j = i or a valid negative
    logits = tf.where(keep, logits, tf.cast(_NEG, logits.dtype))
    if feats_ext is not None:
        ext = tf.einsum("bid,bjd->bij", feats_q, feats_ext) / tau
        if valid_ext is not None:
            ext = tf.where(tf.cast(valid_ext, tf.bool)[:, None, :], ext, tf.cast(_NEG, ext.dtype))
        logits = tf.concat([logits, ext], axis=-1)
    per_query = tf.reduce_logsumexp(logits, axis=-1) - pos                      # −log softmax of the positive
    w = tf.cast(valid, per_query.dtype)
    return tf.reduce_sum(w * per_query, axis=-1) / tf.maximum(tf.reduce_sum(w, axis=-1), 1.0)


# ------------------------------------------------------------------------------------------ loss class

def _check_image(x, arg, channels=(1,)):
    return tf.cast(ops.check_image(x, arg, channels=channels, finite=False), tf.float32)


class PatchNCE:
    """d12(I1 ‖ I2∘φ) (paper §2). ``PatchNCE(A1, F1, A2, F2).loss`` is d12, ``PatchNCE(A2, F2, A1, F1).loss``
    is d21.

    ae_fixed / ae_moved: callables ``ae(x) -> [recon, f1, .., fL]`` (features at equal resolutions on both
    sides); heads_fixed / heads_moved: lists of callables ``(N, C_k) -> (N, D)`` (outputs are L2-normalised
    again here when ``normalize``). nb_layers: number of feature layers used (default: len(heads)).
    freeze_autoencoders: set ``trainable=False`` on Keras autoencoders (False for SupPretrain).
    seed: None → TF's global RNG (``tf.random.uniform``, follows ``tf.random.set_seed``); int → an own
    ``tf.random.Generator.from_seed(seed)``; or a shared ``tf.random.Generator`` (checkpoint it for an
    exact resume).
    """

    def __init__(self, ae_fixed, heads_fixed, ae_moved, heads_moved, num_patches=PAPER.num_patches,
                 tau=PAPER.nce_tau, masked=False, mask_threshold=DEFAULT_MASK_THRESHOLD, nb_layers=None,
                 normalize=True, freeze_autoencoders=True, seed=None, name="patchnce"):
        heads_fixed, heads_moved = list(heads_fixed), list(heads_moved)
        if len(heads_fixed) != len(heads_moved):
            raise ContraRegInputError(f"{name}: heads_fixed has {len(heads_fixed)} heads but heads_moved "
                                      f"has {len(heads_moved)}")
        self.nb_layers = len(heads_fixed) if nb_layers is None else int(nb_layers)
        if not 1 <= self.nb_layers <= len(heads_fixed):
            raise ContraRegInputError(f"{name}: nb_layers={nb_layers} needs 1..{len(heads_fixed)} "
                                      f"(one head per layer)")
        if int(num_patches) < 1 or not tau > 0:
            raise ContraRegInputError(f"{name}: need num_patches >= 1 and tau > 0, got {num_patches}, {tau}")
        self.ae_fixed, self.ae_moved = ae_fixed, ae_moved
        self.heads_fixed, self.heads_moved = heads_fixed, heads_moved
        self.num_patches, self.tau, self.masked = int(num_patches), float(tau), bool(masked)
        self.mask_threshold, self.normalize, self.name = float(mask_threshold), normalize, name
        self.frozen = bool(freeze_autoencoders)
        if self.frozen:
            for ae in (ae_fixed, ae_moved):
                if isinstance(ae, tf.Module) and hasattr(ae, "trainable"):
                    ae.trainable = False
        if not (seed is None or isinstance(seed, (int, np.integer, tf.random.Generator))):
            raise ContraRegInputError(f"{name}: seed must be None, an int or a tf.random.Generator, got {seed!r}")
        self.rng = tf.random.Generator.from_seed(int(seed)) if isinstance(seed, (int, np.integer)) else seed
        self.__name__ = name  # Keras names the loss metric after this

    # -- pieces
    @property
    def heads(self):
        """The distinct head modules (trainable with the registration network)."""
        seen, out = set(), []
        for h in self.heads_fixed + self.heads_moved:
            if id(h) not in seen:
                seen.add(id(h))
                out.append(h)
        return out

    @property
    def trainable_variables(self):
        seen, out = set(), []
        for h in self.heads:
            for v in getattr(h, "trainable_variables", []):
                if v.ref() not in seen:
                    seen.add(v.ref())
                    out.append(v)
        return out

    def _features(self, ae, x, arg):
        outs = ae(x, training=False) if (self.frozen and isinstance(ae, tf.keras.layers.Layer)) else ae(x)
        if not isinstance(outs, (list, tuple)) or len(outs) < self.nb_layers + 1:
            got = f"{len(outs)} outputs" if isinstance(outs, (list, tuple)) else type(outs).__name__
            raise ContraRegInputError(f"{self.name}: the autoencoder applied to {arg} must return "
                                      f"[recon, f1, .., f{self.nb_layers}], got {got}")
        return list(outs[1:1 + self.nb_layers])

    def _project(self, head, feat, idx):
        """Gather feat (B, *sp, C) at flat idx (B, n) and project: (B, n, D)."""
        c = feat.shape[-1]
        b = tf.shape(feat)[0]
        g = tf.gather(tf.reshape(feat, [b, -1, c]), idx, batch_dims=1)
        p = head(tf.reshape(g, [-1, c]))
        p = tf.reshape(p, [b, tf.shape(idx)[1], tf.shape(p)[-1]])
        return ops.l2_normalize(p) if self.normalize else p

    def _layer_mask(self, mask, feat):
        b = tf.shape(feat)[0]
        if mask is None:
            return tf.reshape(tf.ones(tf.shape(feat)[:-1], tf.bool), [b, -1])
        sp = feat.shape[1:-1].as_list()
        if None in sp or None in mask.shape[1:-1].as_list():
            raise ContraRegInputError(f"{self.name}: masked sampling needs static spatial shapes, got "
                                      f"features {feat.shape} and mask {mask.shape}")
        return tf.reshape(resize_mask(mask, sp), [b, -1])

    def compute(self, y_true, y_pred, masks=None, ext=None, return_samples=False):
        """d12 per sample (B,). masks: optional (m_fixed, m_moved) binary foregrounds (mCR; default:
        ``x > mask_threshold`` of the two images). ext: optional (B, *vol, 1) external negative image.
        return_samples: also return per-layer dicts {idx, valid, mask} (mask: (B, N) bool or None)."""
        y_true = _check_image(y_true, f"{self.name}: y_true (fixed image)")
        y_pred = _check_image(y_pred, f"{self.name}: y_pred (moved image)")
        if y_true.shape[1:-1] != y_pred.shape[1:-1]:
            raise ContraRegInputError(f"{self.name}: y_true {y_true.shape} and y_pred {y_pred.shape} "
                                      f"differ in spatial shape")
        fq = self._features(self.ae_fixed, y_true, "y_true")
        fk = self._features(self.ae_moved, y_pred, "y_pred")
        mask = mask_ext = None
        if self.masked:
            if masks is None:
                mask = tf.logical_or(y_true > self.mask_threshold, y_pred > self.mask_threshold)
            else:
                if len(masks) != 2:
                    raise ContraRegInputError(f"{self.name}: masks must be (m_fixed, m_moved)")
                m0, m1 = (tf.convert_to_tensor(m) for m in masks)
                if m0.shape[1:1 + y_true.shape.rank - 2] != y_true.shape[1:-1] or m0.shape != m1.shape:
                    raise ContraRegInputError(f"{self.name}: masks {m0.shape}, {m1.shape} do not match the "
                                              f"image shape {y_true.shape}")
                mask = tf.logical_or(tf.cast(m0, tf.float32) > 0, tf.cast(m1, tf.float32) > 0)
        if ext is not None:
            ext = _check_image(ext, f"{self.name}: ext (external negatives image)")
            if ext.shape[1:-1] != y_pred.shape[1:-1]:
                raise ContraRegInputError(f"{self.name}: ext {ext.shape} and y_pred {y_pred.shape} differ "
                                          f"in spatial shape")
            fe = self._features(self.ae_moved, ext, "ext")
            mask_ext = ext > self.mask_threshold if self.masked else None

        total, samples = 0.0, []
        for k in range(self.nb_layers):
            if fq[k].shape[1:-1] != fk[k].shape[1:-1]:
                raise ContraRegInputError(f"{self.name}: layer {k + 1} features differ in shape between the "
                                          f"two autoencoders: {fq[k].shape} vs {fk[k].shape}")
            m_k = self._layer_mask(mask, fq[k])
            idx, valid = sample_locations(m_k, self.num_patches, self.rng)
            q = self._project(self.heads_fixed[k], fq[k], idx)
            kp = self._project(self.heads_moved[k], fk[k], idx)
            e = valid_e = None
            if ext is not None:
                idx_e, valid_e = sample_locations(self._layer_mask(mask_ext, fe[k]), self.num_patches, self.rng)
                e = self._project(self.heads_moved[k], fe[k], idx_e)
            total += patchnce(q, kp, valid, self.tau, e, valid_e)
            samples.append(dict(idx=idx, valid=valid, mask=m_k if self.masked else None))
        return (total, samples) if return_samples else total

    __call__ = compute

    def loss(self, y_true, y_pred):
        """Keras loss: y_true = fixed image (B, *vol, 1) [optionally a 2nd channel = ExtNegs image of the
        moved modality], y_pred = moved image of the other modality. Returns (B,)."""
        y_true = _check_image(y_true, f"{self.name}: y_true", channels=(1, 2))
        ext = None
        if y_true.shape[-1] == 2:
            y_true, ext = y_true[..., :1], y_true[..., 1:]
        return self.compute(y_true, y_pred, ext=ext)


def bidirectional_patchnce(d12, d21, i1, i2_moved, i2, i1_moved, masks12=None, masks21=None,
                           ext2=None, ext1=None):
    """L_sim = ½ (d12(I1 ‖ I2∘φ) + d21(I2 ‖ I1∘φ⁻¹)) per sample (B,) (paper §2).
    ext2 (modality 2) are ExtNegs for d12, ext1 (modality 1) for d21."""
    return 0.5 * (d12(i1, i2_moved, masks=masks12, ext=ext2) + d21(i2, i1_moved, masks=masks21, ext=ext1))


class BidirectionalPatchNCE:
    """Holds d12 = PatchNCE(A1, F1, A2, F2) and d21 = PatchNCE(A2, F2, A1, F1) (same kwargs; a given
    int ``seed`` seeds d12 with seed and d21 with seed + 1); calling it gives L_sim per sample (B,)."""

    def __init__(self, ae1, heads1, ae2, heads2, seed=None, **kwargs):
        self.d12 = PatchNCE(ae1, heads1, ae2, heads2, seed=seed, name="d12", **kwargs)
        seed21 = seed + 1 if isinstance(seed, (int, np.integer)) else seed
        self.d21 = PatchNCE(ae2, heads2, ae1, heads1, seed=seed21, name="d21", **kwargs)

    @property
    def trainable_variables(self):
        return self.d12.trainable_variables  # d21 uses the same heads

    def __call__(self, i1, i2_moved, i2, i1_moved, masks12=None, masks21=None, ext2=None, ext1=None):
        return bidirectional_patchnce(self.d12, self.d21, i1, i2_moved, i2, i1_moved, masks12, masks21,
                                      ext2, ext1)


# ------------------------------------------------------------------------------- voxelmorph drop-in
class HeadsTrainer(tf.keras.Model):
    """Wraps a (voxelmorph) model so that Keras ``compile``/``fit`` also trains the PatchNCE heads.
    Outputs are the wrapped model's outputs; weights are shared, so save ``trainer.registration`` (the
    plain model) as usual. The frozen autoencoders are not tracked."""

    def __init__(self, model, heads, name=None):
        super().__init__(name=name or f"{model.name}_with_heads")
        self.registration = model
        self.heads = list(heads)
        self.references = getattr(model, "references", None)

    def call(self, inputs, training=None):
        return self.registration(inputs, training=training)


def attach_heads(model, *losses, name=None):
    """Return a :class:`HeadsTrainer` around ``model`` tracking the heads of the given PatchNCE /
    BidirectionalPatchNCE objects (deduplicated): compile and fit it instead of ``model``."""
    heads, seen = [], set()
    for lo in losses:
        for h in (lo.d12.heads if isinstance(lo, BidirectionalPatchNCE) else lo.heads):
            if not isinstance(h, tf.Module):
                raise ContraRegInputError(f"attach_heads: head {h!r} is not a Keras layer / tf.Module, its "
                                          f"weights cannot be trained by fit()")
            if id(h) not in seen:
                seen.add(id(h))
                heads.append(h)
    if not heads:
        raise ContraRegInputError("attach_heads: no PatchNCE loss objects given")
    return HeadsTrainer(model, heads, name=name)
