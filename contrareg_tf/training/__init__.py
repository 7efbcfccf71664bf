"""Training (paper §3): one shared loop (``loop``) and the trainers built on it — the λ-conditioned registration
network (``registration``), autoencoder pretraining and SupPretrain (``autoencoder``), MASR-Net (``masr``).
"""
from ..errors import TrainingDiverged  # noqa: F401
from .autoencoder import reconstruction_loss, train_autoencoder, train_sup_pretrain  # noqa: F401
from .loop import _distribute, get_strategy, run_loop, set_mixed_precision, step_rng  # noqa: F401
from .masr import train_masr  # noqa: F401
from .synthmorph import is_synthmorph, train_synthmorph  # noqa: F401
from .registration import (PairSampler, RegistrationSetup, build_components, make_train_step,  # noqa: F401
                           setup_registration, train_hyper)

__all__ = ["PairSampler", "TrainingDiverged", "build_components", "get_strategy", "make_train_step",
           "reconstruction_loss", "run_loop", "set_mixed_precision", "setup_registration", "step_rng", "train_autoencoder",
           "train_hyper", "train_masr", "train_sup_pretrain"]
