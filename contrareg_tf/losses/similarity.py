"""The bidirectional similarity term of the paper (§2):

    L_sim = ½ · ( d12(I1 ‖ I2∘φ) + d21(I2 ‖ I1∘φ⁻¹) )

for every similarity the paper compares (Table 1): contrastive CR / mCR (PatchNCE, ``patchnce.py``) and its
extensions (+MI, +ExtNegs), MI, local MI, MIND, NGF, and DNS (``dns.py``). ``build_similarity(name, ...)``
is the one place that maps a ``--loss`` name to loss objects; ``objective.py`` combines L_sim with L_reg.

Convention: I1 = modality 1 (T1w) of subject a is the *target*, I2 = modality 2 (T2w) of subject b the
*source*; the network warps I2 onto I1 (y_source = I2∘φ) and I1 onto I2 (y_target = I1∘φ⁻¹).
"""
from ..config import PAPER

LOSS_NAMES = ("mcr", "cr", "mi", "lmi", "mind", "ngf", "cr+mi", "cr+extnegs", "cr+mi+extnegs",
              "mcr+mi", "mcr+extnegs", "dns")


def is_contrastive(name):
    return name.split("+")[0] in ("cr", "mcr")


def _check_name(name):
    from ..errors import ContraRegInputError

    if name not in LOSS_NAMES:
        raise ContraRegInputError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")


class BidirSimilarity:
    """Callable ``(i1, i2, moved2, moved1, masks=None, ext=None) -> dict of per-sample (B,) terms`` with key
    ``'sim'`` holding L_sim (the paper's ½(d12 + d21), plus +MI for the ``+mi`` variants).

    ``masks`` = (fixed-side mask for d12, moved-side mask for d12, fixed-side mask for d21, moved-side mask
    for d21) for mCR; ``ext`` = (ext1, ext2): another subject's T1w and T2w (ExtNegs negatives; d12's moved
    side is T2w so it takes ext2, d21's takes ext1)."""

    def __init__(self, name, cfg=PAPER, ae1=None, ae2=None, heads1=None, heads2=None, dns_model=None, seed=None):
        _check_name(name)
        self.name = name
        parts = name.split("+")
        self.base = parts[0]
        self.add_mi = "mi" in parts[1:]
        self.ext_negs = "extnegs" in parts[1:]
        self.heads = [h for h in (heads1 or []) + (heads2 or [])]
        if is_contrastive(name):
            from .patchnce import PatchNCE

            if ae1 is None or ae2 is None or heads1 is None or heads2 is None:
                from ..errors import ContraRegInputError

                raise ContraRegInputError(f"loss {name!r} needs two autoencoders and two head sets")
            masked = self.base == "mcr"
            kw = dict(num_patches=cfg.num_patches, tau=cfg.nce_tau, masked=masked, seed=seed)
            self.d12 = PatchNCE(ae1, heads1, ae2, heads2, **kw)
            self.d21 = PatchNCE(ae2, heads2, ae1, heads1, **kw)
        elif self.base == "mi":
            from .mi import MutualInformation

            self.d12 = self.d21 = MutualInformation(bins=cfg.mi_bins)
        elif self.base == "lmi":
            from .mi import LocalMutualInformation

            self.d12 = self.d21 = LocalMutualInformation(bins=cfg.lmi_bins, patch=cfg.lmi_patch)
        elif self.base == "mind":
            from .mind import MIND

            self.d12 = self.d21 = MIND(distance=cfg.mind_distance, patch=cfg.mind_patch)
        elif self.base == "ngf":
            from .ngf import NGF

            self.d12 = self.d21 = NGF()
        elif self.base == "dns":
            from .dns import DNS

            # dns_model: a MASR-Net model or .h5 path; None = the weights shipped in models/ for this ndim
            self.d12 = self.d21 = DNS(dns_model)
        if self.add_mi:
            from .mi import MutualInformation

            self.mi = MutualInformation(bins=cfg.mi_bins)

    @property
    def trainable_variables(self):
        return [v for h in self.heads for v in h.trainable_variables]

    def _term(self, loss, fixed, moved, mask_f=None, mask_m=None, ext=None):
        if is_contrastive(self.name):
            masks = None if mask_f is None else (mask_f, mask_m)
            return loss.compute(fixed, moved, masks=masks, ext=ext if self.ext_negs else None)
        return loss.loss(fixed, moved)

    def __call__(self, i1, i2, moved2, moved1, masks=None, ext=None):
        m = masks or (None, None, None, None)
        e1, e2 = ext if ext is not None else (None, None)
        d12 = self._term(self.d12, i1, moved2, m[0], m[1], e2)
        d21 = self._term(self.d21, i2, moved1, m[2], m[3], e1)
        out = {"d12": d12, "d21": d21, "sim": 0.5 * (d12 + d21)}
        if self.add_mi:
            mi = 0.5 * (self.mi.loss(i1, moved2) + self.mi.loss(i2, moved1))
            out["mi"] = mi
            out["sim"] = out["sim"] + mi
        return out
