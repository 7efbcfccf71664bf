"""Networks: the λ-conditioned VxmDense (FiLM hypernetwork, paper §2), the modality autoencoders and the
projection heads (paper §2–3), and MASR-Net (DNS paper)."""
from .autoencoder import (build_autoencoder, feature_channels, feature_strides, freeze, load_autoencoder,  # noqa
                          load_autoencoder_weights, random_autoencoder, save_autoencoder)
from .heads import ProjectionHead, build_heads  # noqa: F401
from .hyper import FiLMVxmDense, build_hyper_vxm, load_registration_weights, register, warp  # noqa: F401
from .layers import FiLM, L2Normalize  # noqa: F401
from .masr import BlurPool, DNSLayer, LinearUpsample, build_masr, dns_features, load_masr, save_masr  # noqa: F401
from .weights import check_weights_file, load_weights  # noqa: F401
