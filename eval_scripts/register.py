#!/usr/bin/env python
"""Register a T1w/T2w NIfTI pair with a trained λ-conditioned model.

Thin wrapper over ``contrareg_tf/commands/register.py``; installed as the console command ``contrareg-register``
(``contrareg-register --help``).
"""
import os

# TF's C++ start-up lines would precede the one-line error message
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from contrareg_tf.commands.register import cli, main, parse  # noqa: E402,F401

if __name__ == "__main__":
    cli()
