#!/usr/bin/env python
"""Train the λ-conditioned registration network (ContraReg paper §2–3).

Thin wrapper over ``contrareg_tf/commands/train_hyper.py``; installed as the console command ``contrareg-train-hyper``
(``contrareg-train-hyper --help``).
"""
from contrareg_tf.commands.train_hyper import cli, main, parse  # noqa: E402,F401

if __name__ == "__main__":
    cli()
