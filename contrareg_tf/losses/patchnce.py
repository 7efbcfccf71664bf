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
from .nce import paired_nce, valid_mean

DEFAULT_MASK_THRESHOLD = FOREGROUND_LEVEL   # foreground = intensity > 5% of the [0, 1] range (not in paper)


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
    if valid is None:
        valid = tf.ones(tf.shape(feats_q)[:2], tf.bool)
    valid = tf.cast(valid, tf.bool)
    ext_negatives = None if valid_ext is None else tf.cast(valid_ext, tf.bool)[:, None, :]
    per_query = paired_nce(feats_q, feats_k, valid[:, None, :], tau, feats_ext, ext_negatives)
    return valid_mean(per_query, valid)


# ------------------------------------------------------------------------------ heads + loss, batched
def _stackable(head):
    """A ProjectionHead-like MLP whose Dense layers can run as one batched matmul with other heads'."""
    layers = getattr(head, "dense_layers", None)
    return (layers and all(isinstance(d, tf.keras.layers.Dense) and d.built for d in layers)
            and all(d.activation in (tf.keras.activations.relu, tf.keras.activations.linear) for d in layers))


def apply_heads(calls):
    """Project gathered features: ``calls`` = list of (head, g (B, n, C)) → list of (B, n, D).

    One call per distinct head (the rows of all its calls concatenated). Heads with ``dense_layers`` (the
    paper's ProjectionHead: Dense–ReLU–…–Dense then x/(‖x‖+eps)) and equal row counts and widths run their
    first Dense each, then every further depth as one batched matmul over all heads (same arithmetic per
    row as separate calls)."""
    order, rows = [], {}
    for head, g in calls:
        if id(head) not in rows:
            order.append(head)
            rows[id(head)] = []
        rows[id(head)].append(g)
    flat = {}
    for head in order:
        gs = rows[id(head)]
        x = [tf.reshape(g, [-1, g.shape[-1]]) for g in gs]
        flat[id(head)] = tf.concat(x, 0) if len(x) > 1 else x[0]
    out = {}
    groups = {}
    for head in order:
        if _stackable(head):
            d = head.dense_layers
            key = (len(d), tuple(int(x.units) for x in d), flat[id(head)].shape[0],
                   getattr(head.normalize, "eps", None) if hasattr(head, "normalize") else None,
                   tuple(x.activation.__name__ for x in d), tuple(x.use_bias for x in d))
            if key[2] is not None:
                groups.setdefault(key, []).append(head)
                continue
        out[id(head)] = head(flat[id(head)])
    for key, heads in groups.items():
        if len(heads) == 1:
            out[id(heads[0])] = heads[0](flat[id(heads[0])])
            continue
        y = tf.stack([h.dense_layers[0](flat[id(h)]) for h in heads])                       # (H, R, U)
        for i in range(1, key[0]):
            dl = [h.dense_layers[i] for h in heads]
            y = tf.matmul(y, tf.stack([tf.cast(d.kernel, y.dtype) for d in dl]))
            if dl[0].use_bias:
                y = y + tf.stack([tf.cast(d.bias, y.dtype) for d in dl])[:, None, :]
            y = dl[0].activation(y)   # relu or linear, the same for every head of the group (key)
        if key[3] is not None:
            y = heads[0].normalize(y)
        for h, yh in zip(heads, tf.unstack(y)):
            out[id(h)] = yh
    res, pos = [], {}
    for head, g in calls:
        p = out[id(head)]
        sizes = [tf.shape(x)[0] * tf.shape(x)[1] for x in rows[id(head)]]
        if len(sizes) > 1:
            if id(head) not in pos:
                pos[id(head)] = iter(tf.split(p, tf.stack(sizes), axis=0))
            p = next(pos[id(head)])
        res.append(tf.reshape(p, tf.concat([tf.shape(g)[:2], tf.shape(p)[-1:]], 0)))
    return res


def _self_normalising(head):
    return isinstance(getattr(head, "normalize", None), tf.keras.layers.Layer)


def score_jobs(jobs):
    """The loss of each job (:meth:`PatchNCE.sampled_features`), summed over layers: (B,) per job.

    All heads run through :func:`apply_heads` at once and every (job, layer) with equal shapes shares one
    :func:`patchnce` call (the per-sample terms are independent, so stacking them on the batch axis changes
    nothing)."""
    calls, where = [], []
    for j, job in enumerate(jobs):
        for k, lay in enumerate(job["layers"]):
            for role in ("q", "k", "e"):
                if lay[role] is not None:
                    where.append((j, k, role))
                    calls.append(lay[role])
    proj = {}
    for (j, k, role), (head, _), p in zip(where, calls, apply_heads(calls)):
        # heads that end in x/(‖x‖+eps) (ProjectionHead) are not normalised a second time
        proj[j, k, role] = ops.l2_normalize(p) if jobs[j]["normalize"] and not _self_normalising(head) else p
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


# ------------------------------------------------------------------------------ features at sampled points
def _conv_input(tensor):
    """The Keras layer that produced a functional-model tensor and that layer's input tensor."""
    hist = tensor._keras_history
    node = hist.layer.inbound_nodes[hist.node_index]
    return hist.layer, node.input_tensors


def point_split(ae, nb_layers):
    """``(trunk, point)`` so that ``ae``'s feature layer L = ``nb_layers`` is evaluated at sampled locations only,
    or None where that does not apply (then the loss calls ``ae`` and gathers from the full maps).

    Applies to a Keras functional model whose output L is a ``Conv{2,3}D`` (kernel k, any stride, 'same'
    padding, no dilation), optionally fed by an integer nearest up-sampling (:class:`NearestUpsample` /
    ``UpSampling{2,3}D``). ``trunk`` is a model (same layers and weights) with outputs [f1, .., f_{L-1}, a],
    a = that conv's (pre-up-sampling) input; ``point`` a :class:`_PointConv` that computes f_L at given flat
    locations from a. Exact: the same sum over the k^ndim·C inputs as the convolution (the order of the
    float additions differs). f_L feeds nothing the loss uses, so nothing else needs the full map."""
    from ..networks.layers import NearestUpsample

    if not (isinstance(ae, tf.keras.Model) and getattr(ae, "_is_graph_network", False)):
        return None
    try:
        conv, x = _conv_input(ae.outputs[nb_layers])
    except (AttributeError, IndexError, TypeError):
        return None
    L = tf.keras.layers
    if (not isinstance(conv, (L.Conv2D, L.Conv3D)) or isinstance(conv, (L.Conv2DTranspose, L.Conv3DTranspose))
            or conv.padding != "same" or any(d != 1 for d in conv.dilation_rate) or conv.groups != 1
            or conv.data_format != "channels_last" or isinstance(x, (list, tuple))):
        return None
    factor, prev = 1, x._keras_history.layer
    if isinstance(prev, NearestUpsample):
        factor = prev.factor
    elif isinstance(prev, (L.UpSampling2D, L.UpSampling3D)):
        size = set(prev.size)
        if len(size) != 1 or getattr(prev, "interpolation", "nearest") != "nearest":
            return None
        factor = size.pop()
    if factor != 1:
        prev, x = _conv_input(x)
    trunk = tf.keras.Model(ae.inputs, list(ae.outputs[1:nb_layers]) + [x], name=f"{ae.name}_trunk{nb_layers}")
    return trunk, _PointConv(conv, factor)


class _PointConv:
    """A Keras Conv layer (after an optional ×``factor`` nearest up-sampling) at flat output locations:
    ``(a (B, *S, C), idx (B, n)) -> (B, n, C_out)``: the k^ndim·C input patch of each location (zeros outside
    the up-sampled grid, TF's 'same' padding: ⌊total/2⌋ before) gathered and multiplied by the kernel."""

    def __init__(self, conv, factor=1):
        self.conv, self.factor = conv, int(factor)
        self.ksize, self.strides = tuple(conv.kernel_size), tuple(conv.strides)
        self.ndim = len(self.ksize)
        self.offsets = np.stack(np.meshgrid(*[np.arange(k) for k in self.ksize], indexing="ij"),
                                -1).reshape(-1, self.ndim).astype(np.int32)   # row-major = kernel layout

    def out_shape(self, src_shape):
        return [None if s is None else -(-s * self.factor // st) for s, st in zip(src_shape, self.strides)]

    def __call__(self, a, idx):
        sp = a.shape[1:-1].as_list()
        c, cout = a.shape[-1], self.conv.filters
        up = [s * self.factor for s in sp]
        out = self.out_shape(sp)
        rem, coords = idx, [None] * self.ndim
        for ax in reversed(range(self.ndim)):
            coords[ax], rem = rem % out[ax], rem // out[ax]
        flat, ok = 0, None
        for ax in range(self.ndim):
            pad_lo = max((out[ax] - 1) * self.strides[ax] + self.ksize[ax] - up[ax], 0) // 2
            u = coords[ax][..., None] * self.strides[ax] + (self.offsets[:, ax] - pad_lo)   # (B, n, K)
            inside = tf.logical_and(u >= 0, u < up[ax])
            ok = inside if ok is None else tf.logical_and(ok, inside)
            flat = flat * sp[ax] + tf.clip_by_value(u, 0, up[ax] - 1) // self.factor
        b, n, kk = tf.shape(a)[0], tf.shape(idx)[1], len(self.offsets)
        g = tf.gather(tf.reshape(a, [b, -1, c]), flat, batch_dims=1)                    # (B, n, K, C)
        g = tf.reshape(g * tf.cast(ok, g.dtype)[..., None], [-1, kk * c])
        y = tf.matmul(g, tf.cast(tf.reshape(self.conv.kernel, [kk * c, cout]), g.dtype))
        if self.conv.use_bias:
            y = y + tf.cast(self.conv.bias, y.dtype)
        return tf.reshape(self.conv.activation(y), [b, n, cout])


class _Features:
    """One image batch's features for layers 1..L: full maps, and (``point``) the last layer only at the
    locations asked for, computed from ``src``."""

    def __init__(self, maps, point=None, src=None):
        self.maps, self.point, self.src = maps, point, src

    def _is_point(self, k):
        return self.point is not None and k == len(self.maps)

    def spatial(self, k):
        if self._is_point(k):
            return self.point.out_shape(self.src.shape[1:-1].as_list())
        return self.maps[k].shape[1:-1].as_list()

    def all_locations(self, k):
        """(B, N_k) all-True: every location of layer k may be sampled."""
        sp = self.spatial(k)
        b = tf.shape(self.src if self._is_point(k) else self.maps[k])[0]
        n = int(np.prod(sp)) if None not in sp else tf.reduce_prod(tf.shape(self.maps[k])[1:-1])
        return tf.ones(tf.stack([b, n]), tf.bool)

    def at(self, k, idx):
        """Layer k's features at flat locations idx (B, n): (B, n, C_k)."""
        if self._is_point(k):
            return self.point(self.src, idx)
        f = self.maps[k]
        return tf.gather(tf.reshape(f, [tf.shape(f)[0], -1, f.shape[-1]]), idx, batch_dims=1)


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
    exact resume). point_last: compute the last feature layer only at the sampled locations where
    :func:`point_split` applies (same value; False = from the full map, the plain reading).
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
        """The features of ``ae(x)`` for layers 1..L as a :class:`_Features` (the last one evaluated at the
        sampled locations only when ``split`` (a :func:`point_split`) applies)."""
        call = ((lambda m, t: m(t, training=False)) if (self.frozen and isinstance(ae, tf.keras.layers.Layer))
                else (lambda m, t: m(t)))
        if split is not None and None not in x.shape[1:-1].as_list():
            trunk, point = split
            outs = call(trunk, x)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            return _Features(list(outs[:-1]), point, outs[-1])
        outs = call(ae, x)
        if not isinstance(outs, (list, tuple)) or len(outs) < self.nb_layers + 1:
            got = f"{len(outs)} outputs" if isinstance(outs, (list, tuple)) else type(outs).__name__
            raise ContraRegInputError(f"{self.name}: the autoencoder applied to {arg} must return "
                                      f"[recon, f1, .., f{self.nb_layers}], got {got}")
        return _Features(list(outs[1:1 + self.nb_layers]))

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


def bidirectional_terms(d12, d21, i1, i2_moved, i2, i1_moved, masks12=None, masks21=None, ext2=None, ext1=None):
    """(d12(I1 ‖ I2∘φ), d21(I2 ‖ I1∘φ⁻¹)) per sample (B,) each, computed together: the same random draws as
    ``d12(...)`` then ``d21(...)``, and all heads / PatchNCE terms of both directions batched
    (:func:`score_jobs`). ext2 (modality 2) are ExtNegs for d12, ext1 (modality 1) for d21."""
    if not (isinstance(d12, PatchNCE) and isinstance(d21, PatchNCE)):
        return (d12(i1, i2_moved, masks=masks12, ext=ext2), d21(i2, i1_moved, masks=masks21, ext=ext1))
    jobs = [d12.sampled_features(i1, i2_moved, masks12, ext2), d21.sampled_features(i2, i1_moved, masks21, ext1)]
    t12, t21 = score_jobs(jobs)
    return t12, t21


def bidirectional_patchnce(d12, d21, i1, i2_moved, i2, i1_moved, masks12=None, masks21=None,
                           ext2=None, ext1=None):
    """L_sim = ½ (d12(I1 ‖ I2∘φ) + d21(I2 ‖ I1∘φ⁻¹)) per sample (B,) (paper §2).
    ext2 (modality 2) are ExtNegs for d12, ext1 (modality 1) for d21."""
    t12, t21 = bidirectional_terms(d12, d21, i1, i2_moved, i2, i1_moved, masks12, masks21, ext2, ext1)
    return 0.5 * (t12 + t21)


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
