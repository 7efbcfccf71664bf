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

``L_sim = ½ (d12(I1 ‖ I2∘φ) + d21(I2 ‖ I1∘φ⁻¹))`` is ``similarity.BidirSimilarity`` (both directions scored
together by :func:`score_jobs`); voxelmorph users pass ``PatchNCE(A1, F1, A2, F2).loss`` and
``PatchNCE(A2, F2, A1, F1).loss`` to ``compile`` and wrap the model with :func:`attach_heads` so that ``fit``
trains the heads too. The locations come from ``sampling.py``, the kernel from ``nce.py``; two speed devices that
give the same values live with the networks: the heads of all layers and both directions run batched
(``networks/batched_heads.py``) and the last feature layer is computed at the sampled locations only
(``networks/point_features.py``).
"""
import numpy as np
import tensorflow as tf

from .. import ops
from ..config import FOREGROUND_LEVEL, PAPER
from ..errors import ContraRegInputError
from ..networks.batched_heads import project
from ..networks.point_features import encode, point_split
from .nce import paired_nce, valid_mean
from .sampling import resize_mask, sample_locations

DEFAULT_MASK_THRESHOLD = FOREGROUND_LEVEL   # foreground = intensity > 5% of the [0, 1] range (not in paper)


def patchnce(feats_q, feats_k, valid=None, tau=PAPER.nce_tau, feats_ext=None, valid_ext=None):
    """PatchNCE on already-projected unit vectors (the equation in the module docstring, one layer).

    feats_q, feats_k: (B, n, D) queries f_i and keys f_i+ (row i of keys is the positive of query i, the
    other rows are its negatives). valid: (B, n) bool or None (all valid). feats_ext: (B, m, D) extra
    negatives for every query (ExtNegs), valid_ext: (B, m). Returns (B,): mean over valid queries
    (0 where a sample has none).
    """
    if valid is None:
        valid = tf.ones(tf.shape(feats_q)[:2], tf.bool)
    valid = tf.cast(valid, tf.bool)
    ext_negatives = None if valid_ext is None else tf.cast(valid_ext, tf.bool)[:, None, :]
    per_query = paired_nce(feats_q, feats_k, valid[:, None, :], tau, feats_ext, ext_negatives)
    return valid_mean(per_query, valid)


def score_jobs(jobs):
    """The loss of each job (:meth:`PatchNCE.sampled_features`), summed over layers: (B,) per job.

    All heads run through ``batched_heads.project`` at once and every (job, layer) with equal shapes shares one
    :func:`patchnce` call (the per-sample terms are independent, so stacking them on the batch axis changes
    nothing)."""
    calls, where = [], []
    for j, job in enumerate(jobs):
        for k, lay in enumerate(job["layers"]):
            for role in ("q", "k", "e"):
                if lay[role] is not None:
                    where.append((j, k, role))
                    calls.append(lay[role])
    proj = dict(zip(where, project(calls, [jobs[j]["normalize"] for j, _, _ in where])))
    groups = {}
    for j, job in enumerate(jobs):
        for k, lay in enumerate(job["layers"]):
            q, e = proj[j, k, "q"], proj.get((j, k, "e"))
            key = (job["tau"], q.shape[1], q.shape[2], None if e is None else e.shape[1])
            if q.shape[1] is None or (e is not None and e.shape[1] is None):
                key = key + (j, k)
            groups.setdefault(key, []).append((j, k))
    terms = {}
    for key, members in groups.items():
        cat = (lambda xs: tf.concat(xs, 0) if len(xs) > 1 else xs[0])
        lay = [jobs[j]["layers"][k] for j, k in members]
        q = cat([proj[j, k, "q"] for j, k in members])
        kp = cat([proj[j, k, "k"] for j, k in members])
        valid = cat([tf.cast(x["valid"], tf.bool) for x in lay])
        e = valid_e = None
        if key[3] is not None:
            e = cat([proj[j, k, "e"] for j, k in members])
            valid_e = cat([tf.cast(x["valid_e"], tf.bool) for x in lay])
        per = patchnce(q, kp, valid, key[0], e, valid_e)
        parts = tf.split(per, len(members)) if len(members) > 1 else [per]
        terms.update(zip(members, parts))
    return [sum(terms[j, k] for k in range(len(job["layers"]))) for j, job in enumerate(jobs)]


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
    exact resume). point_last: compute the last feature layer only at the sampled locations where
    ``networks.point_features.point_split`` applies (same value; False = from the full map, the plain reading).
    """

    def __init__(self, ae_fixed, heads_fixed, ae_moved, heads_moved, num_patches=PAPER.num_patches,
                 tau=PAPER.nce_tau, masked=False, mask_threshold=DEFAULT_MASK_THRESHOLD, nb_layers=None,
                 normalize=True, freeze_autoencoders=True, seed=None, point_last=True, name="patchnce"):
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
        self.point_last = bool(point_last)
        self._split_fixed = point_split(ae_fixed, self.nb_layers) if self.point_last else None
        self._split_moved = (self._split_fixed if ae_moved is ae_fixed
                             else point_split(ae_moved, self.nb_layers) if self.point_last else None)
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

    def _features(self, ae, split, x, arg):
        return encode(ae, x, self.nb_layers, split, self.frozen, what=f"{self.name}: {arg}")

    def _layer_mask(self, mask, feats, k):
        """(B, N_k) bool: where layer k may be sampled (everywhere for CR)."""
        if mask is None:
            return feats.all_locations(k)
        sp = feats.spatial(k)
        if None in sp or None in mask.shape[1:-1].as_list():
            raise ContraRegInputError(f"{self.name}: masked sampling needs static spatial shapes, got "
                                      f"features {sp} and mask {mask.shape}")
        return tf.reshape(resize_mask(mask, sp), [tf.shape(mask)[0], -1])

    def compute(self, y_true, y_pred, masks=None, ext=None, return_samples=False):
        """d12 per sample (B,). masks: optional (m_fixed, m_moved) binary foregrounds (mCR; default:
        ``x > mask_threshold`` of the two images). ext: optional (B, *vol, 1) external negative image.
        return_samples: also return per-layer dicts {idx, valid, mask} (mask: (B, N) bool or None)."""
        job = self.sampled_features(y_true, y_pred, masks, ext)
        total = score_jobs([job])[0]
        return (total, job["samples"]) if return_samples else total

    def sampled_features(self, y_true, y_pred, masks=None, ext=None):
        """Everything before the heads: the features at the sampled locations, per layer (a "job" for
        :func:`score_jobs`). Random draws in a fixed order: per layer, the locations, then ExtNegs'."""
        y_true = _check_image(y_true, f"{self.name}: y_true (fixed image)")
        y_pred = _check_image(y_pred, f"{self.name}: y_pred (moved image)")
        if y_true.shape[1:-1] != y_pred.shape[1:-1]:
            raise ContraRegInputError(f"{self.name}: y_true {y_true.shape} and y_pred {y_pred.shape} "
                                      f"differ in spatial shape")
        # the fixed image's features take no gradient (nothing trainable feeds them)
        fq = self._features(self.ae_fixed, self._split_fixed, tf.stop_gradient(y_true), "y_true")
        fk = self._features(self.ae_moved, self._split_moved, y_pred, "y_pred")
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
            fe = self._features(self.ae_moved, self._split_moved, tf.stop_gradient(ext), "ext")
            mask_ext = ext > self.mask_threshold if self.masked else None

        layers, samples = [], []
        for k in range(self.nb_layers):
            sp = fq.spatial(k)
            if sp != fk.spatial(k):
                raise ContraRegInputError(f"{self.name}: layer {k + 1} features differ in shape between the "
                                          f"two autoencoders: {sp} vs {fk.spatial(k)}")
            m_k = self._layer_mask(mask, fq, k)
            idx, valid = sample_locations(m_k, self.num_patches, self.rng)
            # gather the sampled locations first; only those are projected (never whole maps)
            lay = dict(q=(self.heads_fixed[k], fq.at(k, idx)), k=(self.heads_moved[k], fk.at(k, idx)),
                       valid=valid, e=None, valid_e=None)
            if ext is not None:
                idx_e, lay["valid_e"] = sample_locations(self._layer_mask(mask_ext, fe, k), self.num_patches,
                                                         self.rng)
                lay["e"] = (self.heads_moved[k], fe.at(k, idx_e))
            layers.append(lay)
            samples.append(dict(idx=idx, valid=valid, mask=m_k if self.masked else None))
        return dict(layers=layers, samples=samples, tau=self.tau, normalize=self.normalize)

    __call__ = compute

    def loss(self, y_true, y_pred):
        """Keras loss: y_true = fixed image (B, *vol, 1) [optionally a 2nd channel = ExtNegs image of the
        moved modality], y_pred = moved image of the other modality. Returns (B,)."""
        y_true = _check_image(y_true, f"{self.name}: y_true", channels=(1, 2))
        ext = None
        if y_true.shape[-1] == 2:
            y_true, ext = y_true[..., :1], y_true[..., 1:]
        return self.compute(y_true, y_pred, ext=ext)


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
    """Return a :class:`HeadsTrainer` around ``model`` tracking the heads of the given loss objects (anything
    with ``heads``: :class:`PatchNCE`, ``similarity.BidirSimilarity``; deduplicated): compile and fit it instead
    of ``model``."""
    heads, seen = [], set()
    for lo in losses:
        for h in lo.heads:
            if not isinstance(h, tf.Module):
                raise ContraRegInputError(f"attach_heads: head {h!r} is not a Keras layer / tf.Module, its "
                                          f"weights cannot be trained by fit()")
            if id(h) not in seen:
                seen.add(id(h))
                heads.append(h)
    if not heads:
        raise ContraRegInputError("attach_heads: no PatchNCE loss objects given")
    return HeadsTrainer(model, heads, name=name)
