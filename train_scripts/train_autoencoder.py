#!/usr/bin/env python
"""Pretrain one modality's autoencoder (ContraReg paper §3): L1 + local NCC (window 7), random crops,
flips and brightness/contrast/saturation jitter, Adam. Writes ``--out`` (.h5) and a JSON model card beside it.

Thin wrapper over ``contrareg_tf/commands/train_autoencoder.py``; installed as the console command ``contrareg-train-autoencoder``
(``contrareg-train-autoencoder --help``).
"""
from contrareg_tf.commands.train_autoencoder import cli, main, parse  # noqa: E402,F401

if __name__ == "__main__":
    cli()
