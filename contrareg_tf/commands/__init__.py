"""The command-line programs: one module per command, each an argument parser over the library plus ``cli()``
(the console entry point declared in ``setup.py``). ``train_scripts/*.py`` and ``eval_scripts/*.py`` are
thin wrappers over these modules, so ``python eval_scripts/register.py ...`` and ``contrareg-register ...``
are the same program. ``contrareg-register`` and ``contrareg-instance-opt`` hide TF's C++ start-up lines
(their error contract is one stderr line; see ``contrareg_tf/__init__.py``).

    contrareg-reproduce-table1  contrareg-train-hyper  contrareg-eval-hyper  contrareg-register
    contrareg-instance-opt      contrareg-train-autoencoder  contrareg-train-dns
"""
