"""Where the shipped weights live (the autoencoders and MASR-Net weights of ``models/``, with their JSON cards).

One lookup, in this order:
1. ``$CONTRAREG_MODELS`` if set (a folder of your own weights with the same file names);
2. ``models/`` beside the package — a source checkout or an editable install (``pip install -e .``);
3. ``<prefix>/share/contrareg_tf/models`` — where a regular ``pip install .`` puts ``models/`` (``data_files``
   in ``setup.py``), so a non-editable install keeps the shipped weights.
"""
import os
import sys

_REPO_MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
_INSTALLED_MODELS = os.path.join(sys.prefix, "share", "contrareg_tf", "models")


def models_dir():
    """The folder shipped weights are read from (see the module docstring); the repository's ``models/``
    when none exists yet."""
    env = os.environ.get("CONTRAREG_MODELS")
    if env:
        return env
    for d in (_REPO_MODELS, _INSTALLED_MODELS):
        if os.path.isdir(d):
            return d
    return _REPO_MODELS


def shipped(name):
    """Path of the shipped file ``name`` (it may not exist: callers check)."""
    return os.path.join(models_dir(), name)
