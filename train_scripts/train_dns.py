#!/usr/bin/env python
"""Train MASR-Net (the DNS descriptor network, DNS paper §3.3) by anatomy-aware contrastive learning on
single images (T1w and T2w alike): Bézier intensity augmentation + inversion, InfoNCE between the
descriptors of an image and its augmented copy at N sampled foreground locations.

Thin wrapper over ``contrareg_tf/commands/train_dns.py``; installed as the console command ``contrareg-train-dns``
(``contrareg-train-dns --help``).
"""
from contrareg_tf.commands.train_dns import cli, main, parse_args  # noqa: E402,F401

if __name__ == "__main__":
    cli()
