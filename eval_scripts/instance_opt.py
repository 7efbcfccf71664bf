#!/usr/bin/env python
"""Instance-optimisation registration of one NIfTI pair with MIND-SSC / MIND / DNS / autoencoder features
(DNS paper Table 4 pyramid: 3 levels, Adam lr 1e-2/5e-3/3e-3, 100/80/50 iterations, ‖∇u‖² weights
0.6/0.5/0.4; see contrareg_tf/instance_opt/).

Thin wrapper over ``contrareg_tf/commands/instance_opt.py``; installed as the console command ``contrareg-instance-opt``
(``contrareg-instance-opt --help``). TF's start-up log lines are filtered by ``contrareg_tf.compat``, which the
package imports before TensorFlow.
"""
from contrareg_tf.commands.instance_opt import cli, main, parse  # noqa: F401

if __name__ == "__main__":
    cli()
