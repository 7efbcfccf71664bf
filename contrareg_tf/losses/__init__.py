"""Losses, as voxelmorph users know them (``vxm.losses.NCC().loss``): small classes whose ``.loss(y_true,
y_pred)`` is a Keras loss, plus their functional forms. See each module's docstring for the equation.

    from contrareg_tf.losses import PatchNCE, MutualInformation, MIND, NGF, DNS, VelocityReg

The functions ``mind.mind`` and ``patchnce.patchnce`` are not re-exported: their names are their modules'.
"""
from .dns import DNS, descriptor_similarity, dns_loss  # noqa: F401
from .mi import (LocalMutualInformation, MutualInformation, local_mutual_information,  # noqa: F401
                 mutual_information)
from .mind import MIND, MINDDescriptor, mind_loss, mind_ssc  # noqa: F401
from .ngf import NGF, ngf_loss  # noqa: F401
from .objective import VelocityReg, hyper_loss, velocity_reg  # noqa: F401
from .patchnce import PatchNCE, attach_heads  # noqa: F401
from .similarity import LOSS_NAMES, BidirSimilarity, LossSpec, build_similarity, is_contrastive  # noqa: F401

__all__ = ["DNS", "LocalMutualInformation", "MutualInformation", "MIND", "MINDDescriptor", "NGF", "PatchNCE",
           "BidirSimilarity", "LOSS_NAMES", "LossSpec", "build_similarity", "VelocityReg", "attach_heads",
           "descriptor_similarity",
           "dns_loss", "hyper_loss", "is_contrastive", "local_mutual_information", "mind_loss",
           "mind_ssc", "mutual_information", "ngf_loss", "velocity_reg"]
