"""The bidirectional similarity term of the paper (§2):

    L_sim = ½ · ( d12(I1 ‖ I2∘φ) + d21(I2 ‖ I1∘φ⁻¹) )

for every similarity the paper compares (Table 1): contrastive CR / mCR (PatchNCE, ``patchnce.py``) and its
extensions (+MI, +ExtNegs), MI, local MI, MIND, NGF, and DNS (``dns.py``). ``build_similarity(name, ...)``
is the one place that maps a ``--loss`` name to loss objects; ``objective.py`` combines L_sim with L_reg.

Convention: I1 = modality 1 (T1w) of subject a is the *target*, I2 = modality 2 (T2w) of subject b the
*source*; the network warps I2 onto I1 (y_source = I2∘φ) and I1 onto I2 (y_target = I1∘φ⁻¹).
"""
import dataclasses

import tensorflow as tf
import voxelmorph as vxm

from ..config import ACCR, CORE, PAPER
from ..errors import ContraRegInputError
from .accr import build_accr
from .core import build_core
from .dns import DNS
from .mi import LocalMutualInformation, MutualInformation
from .mind import MIND
from .ngf import NGF
from .patchnce import PatchNCE, score_jobs

# the --loss names: Table 1's set A (mcr, cr, mi, lmi, mind, ngf), set C (+mi, +extnegs), DNS, and the two
# jointly trained representations: CoRe (Kats et al.) and ACCR (the review's proposal; accr-noattn = its ablation
# without the cross-modal attention block)
LOSS_NAMES = ("mcr", "cr", "mi", "lmi", "mind", "ngf", "cr+mi", "cr+extnegs", "cr+mi+extnegs",
              "mcr+mi", "mcr+extnegs", "dns", "core", "accr", "accr-noattn")
CONTRASTIVE = ("cr", "mcr")
# similarities whose feature networks are trained jointly with the registration network (their own weights,
# no autoencoders): they satisfy the ``joint.JointSimilarity`` protocol
JOINT = ("core", "accr", "accr-noattn")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A ``--loss`` name parsed once: ``base`` (one of :data:`_REGISTRY`), ``add_mi`` (``+mi``: global MI
    added to L_sim), ``ext_negs`` (``+extnegs``: negatives also from another subject). Everything else that
    depends on the name is a property here, so no caller re-parses the string."""
    name: str
    base: str
    add_mi: bool = False
    ext_negs: bool = False

    @classmethod
    def parse(cls, name) -> "LossSpec":
        if isinstance(name, LossSpec):
            return name
        key = str(name).strip().lower()
        if key not in LOSS_NAMES:
            raise ContraRegInputError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
        base, *mods = key.split("+")
        return cls(key, base, "mi" in mods, "extnegs" in mods)

    @property
    def contrastive(self) -> bool:
        """CR / mCR (PatchNCE on autoencoder features): needs autoencoders and heads."""
        return self.base in CONTRASTIVE

    @property
    def masked(self) -> bool:
        """mCR: PatchNCE locations sampled inside the (warped) brain masks."""
        return self.base == "mcr"

    needs_masks = masked

    @property
    def joint(self) -> bool:
        """CoRe / ACCR: a feature network trained with the registration network (``joint.JointSimilarity``)."""
        return self.base in JOINT

    @property
    def needs_labels(self) -> bool:
        """ACCR: training batches carry the label maps (``labels1``/``labels2``) for its anatomy-aware negatives."""
        return self.base in ("accr", "accr-noattn")

    @property
    def needs_ext(self) -> bool:
        """ExtNegs: every batch also carries another subject's T1w and T2w."""
        return self.ext_negs

    def alpha(self, cfg=PAPER) -> float:
        """α on L_sim: ``cfg.alpha_contrastive`` (0.1) for CR / mCR and their variants, the method's own
        ``alpha`` for CoRe / ACCR (``config.CORE`` / ``config.ACCR``), else 1.0."""
        if self.contrastive:
            return cfg.alpha_contrastive
        if self.joint:
            return (CORE if self.base == "core" else ACCR).alpha
        return 1.0


def is_contrastive(name) -> bool:
    return LossSpec.parse(name).contrastive


# registry: base -> builder(cfg, ae1, ae2, heads1, heads2, dns_model, masked, seed) -> (d12, d21)
def _patchnce(cfg, ae1, ae2, heads1, heads2, dns_model, masked, seed):
    if ae1 is None or ae2 is None or heads1 is None or heads2 is None:
        raise ContraRegInputError("a contrastive loss needs two autoencoders and two head sets")
    kw = dict(num_patches=cfg.num_patches, tau=cfg.nce_tau, masked=masked, seed=seed)
    return PatchNCE(ae1, heads1, ae2, heads2, **kw), PatchNCE(ae2, heads2, ae1, heads1, **kw)


def _symmetric(make):
    def build(cfg, *args):
        loss = make(cfg, *args)
        return loss, loss
    return build


def _mi(cfg, *_):
    return MutualInformation(bins=cfg.mi_bins)


def _lmi(cfg, *_):
    return LocalMutualInformation(bins=cfg.lmi_bins, patch=cfg.lmi_patch)


def _mind(cfg, *_):
    return MIND(distance=cfg.mind_distance, patch=cfg.mind_patch)


def _ngf(cfg, *_):
    return NGF()


def _dns(cfg, ae1, ae2, heads1, heads2, dns_model, *_):
    return DNS(dns_model)      # a MASR-Net model or .h5 path; None = the shipped weights for this ndim


def _core(cfg, ae1, ae2, heads1, heads2, dns_model, masked, seed):
    obj = build_core(cfg, rng=seed)
    return obj, obj


def _accr(attention):
    def build(cfg, ae1, ae2, heads1, heads2, dns_model, masked, seed):
        obj = build_accr(cfg, attention=attention, rng=seed)
        return obj, obj
    return build


_REGISTRY = {"core": _core, "accr": _accr(True), "accr-noattn": _accr(False), "cr": _patchnce, "mcr": _patchnce,
             "mi": _symmetric(_mi), "lmi": _symmetric(_lmi), "mind": _symmetric(_mind), "ngf": _symmetric(_ngf),
             "dns": _symmetric(_dns)}


def build_similarity(loss, cfg=PAPER, ae1=None, ae2=None, heads1=None, heads2=None, dns_model=None,
                     seed=None) -> "BidirSimilarity":
    """The one place that maps a ``--loss`` name (parsed here) or a :class:`LossSpec` to loss objects."""
    return BidirSimilarity(LossSpec.parse(loss), cfg, ae1, ae2, heads1, heads2, dns_model=dns_model, seed=seed)


class BidirSimilarity:
    """Callable ``(i1, i2, moved2, moved1, masks=None, ext=None) -> dict of per-sample (B,) terms``: ``'d12'``
    (I1 vs I2∘φ), ``'d21'`` (I2 vs I1∘φ⁻¹) and ``'sim'`` = ½(d12 + d21) (+ MI for the ``+mi`` variants).

    ``masks`` = (fixed-side mask for d12, moved-side mask for d12, fixed-side mask for d21, moved-side mask
    for d21) for mCR; ``ext`` = (ext1, ext2): another subject's T1w and T2w (ExtNegs negatives; d12's moved
    side is T2w so it takes ext2, d21's takes ext1). :meth:`training_terms` builds both from a training
    batch and the network's flows, so the trainer does not need to know which loss it runs."""

    def __init__(self, spec, cfg=PAPER, ae1=None, ae2=None, heads1=None, heads2=None, dns_model=None, seed=None):
        self.spec = LossSpec.parse(spec)      # a LossSpec (what build_similarity passes) goes through unchanged
        self.name = self.spec.name
        self.heads1, self.heads2 = list(heads1 or []), list(heads2 or [])
        self.heads = self.heads1 + self.heads2
        self.d12, self.d21 = _REGISTRY[self.spec.base](cfg, ae1, ae2, heads1, heads2, dns_model,
                                                       self.spec.masked, seed)
        if self.spec.add_mi:
            self.mi = _mi(cfg)
        self._warp_mask = None
        if self.spec.masked:      # vxm's layer, zero outside the image (as the moved images' masks)
            self._warp_mask = vxm.layers.SpatialTransformer(interp_method="linear", indexing="ij",
                                                            fill_value=0.0)

    @property
    def trainable_variables(self):
        own = list(self.d12.trainable_variables) if self.spec.joint else []
        return [v for h in self.heads for v in h.trainable_variables] + own

    def checkpoint_items(self):
        """Trackables besides the model and optimiser that the training checkpoint must hold."""
        items = {}
        for side, heads in (("heads1", self.heads1), ("heads2", self.heads2)):
            items.update({f"{side}_{k}": h for k, h in enumerate(heads)})
        if self.spec.joint:
            items.update(self.d12.checkpoint_items())
        return items

    def _contrastive(self, i1, moved2, i2, moved1, masks12, masks21, e2, e1):
        """(d12, d21) of CR / mCR, both directions at once (heads and PatchNCE terms batched): the same random
        draws as d12's call then d21's. e2 (modality 2) are ExtNegs for d12, e1 (modality 1) for d21."""
        on = self.spec.ext_negs
        jobs = [self.d12.sampled_features(i1, moved2, masks12, e2 if on else None),
                self.d21.sampled_features(i2, moved1, masks21, e1 if on else None)]
        d12, d21 = score_jobs(jobs)
        return d12, d21

    def __call__(self, i1, i2, moved2, moved1, masks=None, ext=None):
        m = masks or (None, None, None, None)
        e1, e2 = ext if ext is not None else (None, None)
        if self.spec.joint:
            d12, d21 = self.d12.pair_terms({"img1": i1, "img2": i2}, moved2, moved1)
        elif self.spec.contrastive:
            pair = (lambda a, b: None if a is None else (a, b))
            d12, d21 = self._contrastive(i1, moved2, i2, moved1, pair(m[0], m[1]), pair(m[2], m[3]), e2, e1)
        else:               # MI, local MI, MIND, NGF, DNS: Keras-style losses, no masks or extra images
            d12, d21 = self.d12.loss(i1, moved2), self.d21.loss(i2, moved1)
        out = {"d12": d12, "d21": d21, "sim": 0.5 * (d12 + d21)}
        if self.spec.add_mi:
            mi = 0.5 * (self.mi.loss(i1, moved2) + self.mi.loss(i2, moved1))
            out["mi"] = mi
            out["sim"] = out["sim"] + mi
        return out

    def training_terms(self, batch, moved2, moved1, pos_flow, neg_flow):
        """Terms for a training batch (keys ``img1``, ``img2``, and ``mask1``/``mask2`` for mCR,
        ``ext1``/``ext2`` for ExtNegs): mCR's moved-side masks are the brain masks warped by the same
        flows as the images (linear, > 0.5)."""
        masks = None
        if self.spec.masked:
            wm2 = tf.cast(self._warp_mask([batch["mask2"], pos_flow]) > 0.5, tf.float32)
            wm1 = tf.cast(self._warp_mask([batch["mask1"], neg_flow]) > 0.5, tf.float32)
            masks = (batch["mask1"], wm2, batch["mask2"], wm1)
        if self.spec.joint:
            d12, d21 = self.d12.pair_terms(batch, moved2, moved1, pos_flow, neg_flow)
            return {"d12": d12, "d21": d21, "sim": 0.5 * (d12 + d21)}
        ext = (batch["ext1"], batch["ext2"]) if self.spec.ext_negs else None
        return self(batch["img1"], batch["img2"], moved2, moved1, masks=masks, ext=ext)

