"""Descriptor maps of instance optimisation (DNS paper, CVPR 2024, §3.4; ``solver.py`` optimises over them).

* Descriptors D_F, D_M are computed **once** on the full-resolution images (MIND-SSC, MIND, DNS or the
  ContraReg autoencoder features), Gaussian-smoothed (ψ_σ, σ = ``smooth_sigma`` full-res voxels, replicate
  border, ``ops.gaussian_smooth``: the same ψ_σ as the DNS loss) and resampled linearly (align-corners,
  ``ops.resize_linear``) to each pyramid level; with ``level_features`` they are computed per level on the
  images resampled there (anti-aliased: σ = ``AA_SIGMA`` × the down-sampling factor, in full-size voxels).
* MIND / MIND-SSC at full size: descriptors, ψ_σ, the level resizes and the convex start's pooling are one
  XLA-compiled call per image (``_mind_fn``).
* DNS: MASR-Net (``networks/masr.py``) needs sizes divisible by 8; any other size is mirror-padded and cropped
  back (``_pad8``). Without a model the shipped weights for the images' dimensionality are used
  (``networks.masr.default_weights_path``, looked up by ``assets``); given the images' spacing, weights used
  more than a factor ``DNS_SPACING_FACTOR`` away from the spacing on their card print a ``ContraRegWarning``
  (``networks.masr.check_training_spacing``).
* What the paper leaves open and we chose: which autoencoder layers (all six, each L2-normalised per voxel,
  upsampled to full size), MIND's distance / patch (``config.PAPER``), σ (1 voxel).

``FeatureSpec`` holds the choice of descriptor and its models; ``instance_optimise`` takes it (or a name, a
callable, a pair of callables).
"""
import functools
import os
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import tensorflow as tf

from .. import ops
from ..compat import native_log_filter
from ..config import PAPER
from ..errors import ContraRegInputError
from ..losses import mind as M
from ..networks.autoencoder import load_autoencoder
from ..networks.masr import check_training_spacing, default_weights_path, dns_features, load_masr
from .convex import pool_features

FEATURE_NAMES = ("mindssc", "mind", "dns", "ae")
_MIND_FEATURES = ("mindssc", "mind")


@dataclass
class FeatureSpec:
    """Which descriptor, and its models: ``name`` one of ``FEATURE_NAMES``; ``dns_model`` a MASR-Net (Keras
    model or .h5 path; None = the shipped weights); ``ae_models`` (A1 T1w, A2 T2w) models or .h5 paths with
    ``moving_modality`` the moving image's ('t1' / 't2') and ``ae_layers`` the layers used (1-based, None =
    all); ``mind_distance`` / ``mind_patch`` MIND's; ``spacing`` the images' voxel size in mm (None = unknown:
    no check of the DNS weights' training spacing)."""
    name: str = "mindssc"
    dns_model: object = None
    ae_models: Optional[Sequence] = None
    moving_modality: str = "t1"
    ae_layers: Optional[Sequence[int]] = None
    mind_distance: int = PAPER.mind_distance
    mind_patch: int = PAPER.mind_patch
    spacing: Optional[Sequence[float]] = None

    def options(self):
        """The keyword arguments of :func:`feature_provider` (everything but the name)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


def as_spec(features):
    """A :class:`FeatureSpec` from a name; a spec, a callable or a pair of callables unchanged."""
    return FeatureSpec(features) if isinstance(features, str) else features


def dns_weights_path(dns_model, ndim):
    """The .h5 file DNS descriptors will be read from (``dns_model`` if it is a path, else the shipped weights
    for ``ndim``), or None for a model object."""
    if dns_model is None:
        return default_weights_path(ndim)
    if isinstance(dns_model, (str, bytes)) or hasattr(dns_model, "__fspath__"):
        return str(dns_model)
    return None


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


@functools.lru_cache(maxsize=8)   # bounded like the solver cache: one entry per (setting, level shapes)
def _mind_fn(variant, distance, patch, sigma=0.0, shapes=None, grid=0):
    """MIND / MIND-SSC (``losses.mind``'s equations) as one XLA-compiled function, one per setting (retraced per
    input shape). ``shapes`` None: the descriptors; otherwise a tuple: ψ_σ of them resized
    (``ops.resize_linear``) to each shape of ``shapes``, then, ``grid`` > 0, pooled on ``grid``-voxel cells
    (``pool_features``; the convex start). Same numbers as the eager ops up to float rounding; about half the
    time of separate eager calls (``bench/results/io_profile_note.md``). Fixed and moving are two calls (as one
    batch of two the peak memory was 1.6x higher)."""

    def fn(x):
        d = M.mind_ssc(x, distance, patch // 2) if variant == "mindssc" else M.mind(x, distance, patch)
        if shapes is None:
            return d
        d = ops.gaussian_smooth(d, sigma)
        return tuple(ops.resize_linear(d, s) for s in shapes) + ((pool_features(d, grid),) if grid else ())

    return tf.function(fn, jit_compile=True, autograph=False)


def feature_provider(features="mindssc", ndim=3, dns_model=None, ae_models=None, moving_modality="t1",
                     ae_layers=None, mind_distance=PAPER.mind_distance, mind_patch=PAPER.mind_patch, spacing=None):
    """Return ``(f_fixed, f_moving)``, callables (B,*vol,1) → (B,*vol,C).

    ``features``: 'mindssc' (dilation = mind_distance, radius = mind_patch // 2), 'mind', 'dns'
    (``dns_model``: a MASR-Net Keras model or a .h5 path, default the shipped ``models/dns_proxy{2,3}d.h5``;
    descriptors by ``networks.masr.dns_features``, L2-normalised; any size: mirror-padded to a multiple of 8
    and cropped back, ``_pad8``; ``spacing`` given: the training-spacing check of the weights), 'ae'
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
        path = dns_weights_path(dns_model, ndim)
        if dns_model is None and not os.path.isfile(path):
            raise ContraRegInputError(f"features 'dns' need a MASR-Net model (dns_model=path or Keras "
                                      f"model); no shipped {ndim}-D weights at {path}")
        model = _load_model(path or dns_model, lambda p: load_masr(p, ndim), "dns")
        if path is not None and spacing is not None:
            check_training_spacing(path, spacing)
        f = lambda x: _pad8(lambda y: dns_features(y, model), x)  # noqa: E731
        return f, f
    if features == "ae":
        if ae_models is None or len(ae_models) != 2:
            raise ContraRegInputError("features 'ae' need two autoencoders (ae_models=(A1 T1w, A2 T2w))")
        if moving_modality not in ("t1", "t2"):
            raise ContraRegInputError(f"moving_modality must be 't1' or 't2', got {moving_modality!r}")
        a1, a2 = (_load_model(m, lambda p: load_autoencoder(p, ndim), "ae") for m in ae_models)
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


AA_SIGMA = 0.5


def _downsample(x, shape):
    """Anti-aliased linear resize: ψ with σ = AA_SIGMA · (N/n − 1)... voxels, then ``resize_linear``."""
    f = max(n / m for n, m in zip(x.shape[1:-1], shape))
    if f > 1:
        x = ops.gaussian_smooth(x, AA_SIGMA * f)
    return ops.resize_linear(x, shape)


def feature_maps(features, fx, mv, sigma, shapes, grid=0, level_features=False):
    """ψ_σ(D_F), ψ_σ(D_M) for each level shape of ``shapes`` (module docstring: computed once at full size and
    resized, or with ``level_features`` per level on the images resampled there) and, ``grid`` > 0, both
    full-size maps pooled on ``grid``-voxel cells (the convex start). ``features``: a name, a
    :class:`FeatureSpec`, a callable or a pair of callables. MIND / MIND-SSC at full size: all of it one XLA call
    per image (``_mind_fn``). Returns (list of (df, dm) per level, (F, M) or None)."""
    spec = as_spec(features)
    if isinstance(spec, FeatureSpec) and spec.name in _MIND_FEATURES and not level_features:
        fn = _mind_fn(spec.name, int(spec.mind_distance), int(spec.mind_patch), float(sigma or 0.0),
                      tuple(tuple(int(n) for n in sh) for sh in shapes), int(grid))
        with native_log_filter():          # XLA's one-time "Compiled cluster" line
            pairs = list(zip(fn(fx), fn(mv)))
    else:
        if isinstance(spec, FeatureSpec):
            f_fix, f_mov = feature_provider(spec.name, ndim=fx.ndim - 2, **spec.options())
        else:
            f_fix, f_mov = feature_provider(spec, ndim=fx.ndim - 2)

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

