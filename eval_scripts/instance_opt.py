#!/usr/bin/env python
"""Instance-optimisation registration of one NIfTI pair with MIND-SSC / MIND / DNS / autoencoder features
(DNS paper Table 4 pyramid: 3 levels, Adam lr 1e-2/5e-3/3e-3, 100/80/50 iterations, ‖∇u‖² weights
0.6/0.5/0.4; see contrareg_tf/instance_opt.py).

Thin wrapper over ``contrareg_tf/commands/instance_opt.py``; installed as the console command ``contrareg-instance-opt``
(``contrareg-instance-opt --help``).
"""
import os

# TF's C++ start-up lines would precede the one-line error message
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from contrareg_tf.commands.instance_opt import cli, main, parse  # noqa: E402,F401

if __name__ == "__main__":
    cli()
