#!/usr/bin/env python
"""The main job: reproduce Table 1 / Fig. 3 end to end on the built-in proxy data (or a real data set).

Thin wrapper over ``contrareg_tf/commands/reproduce_table1.py``; installed as the console command ``contrareg-reproduce-table1``
(``contrareg-reproduce-table1 --help``).
"""
from contrareg_tf.commands.reproduce_table1 import cli, main, parse  # noqa: E402,F401

if __name__ == "__main__":
    cli()
