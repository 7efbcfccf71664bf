"""Training (paper §3): one shared loop (``loop``) and the trainers built on it — the λ-conditioned registration
network (``registration``), autoencoder pretraining and SupPretrain (``autoencoder``), MASR-Net (``masr``).
"""
from ..errors import TrainingDiverged  # noqa: F401
from .autoencoder import reconstruction_loss, train_autoencoder, train_sup_pretrain  # noqa: F401
from .loop import _distribute, get_strategy, run_loop, set_mixed_precision, step_rng  # noqa: F401
from .masr import train_masr  # noqa: F401
from .registration import PairSampler, build_components, make_train_step, train_hyper  # noqa: F401

__all__ = ["PairSampler", "TrainingDiverged", "build_components", "get_strategy", "make_train_step",
           "reconstruction_loss", "run_loop", "set_mixed_precision", "step_rng", "train_autoencoder",
           "train_hyper", "train_masr", "train_sup_pretrain"]
