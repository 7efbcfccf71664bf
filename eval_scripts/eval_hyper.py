#!/usr/bin/env python
"""Evaluate trained λ-conditioned models over the paper's 17 λ values; write one CSV per method, Table 1
(Markdown + CSV), Fig. 3-style curves and Fig. 2-style example slices.

Thin wrapper over ``contrareg_tf/commands/eval_hyper.py``; installed as the console command ``contrareg-eval-hyper``
(``contrareg-eval-hyper --help``).
"""
from contrareg_tf.commands.eval_hyper import cli, main, parse  # noqa: E402,F401

if __name__ == "__main__":
    cli()
