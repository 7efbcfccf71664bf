"""Test setup: the compat shim first, quiet TF, single-threaded determinism where it matters."""
import hashlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import contrareg_tf  # noqa: E402,F401  (installs the compat patches before neurite/voxelmorph)
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test (minutes); still run in CI")


def tree_hash(root):
    """{relative path: sha256} of every file under ``root`` (byte-identity checks of builds)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out
