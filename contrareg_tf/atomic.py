"""Atomic file writes: every output of the package goes through ``atomic_path`` so that a failure (bad input
found late, a crash, Ctrl-C) never leaves a partial file behind."""
import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path`` (mode 0644), on any
    exception it is removed and the exception propagates. ``suffix`` (default: ``path``'s extension, with
    ``.nii.gz`` kept whole) lets writers that pick the format from the file name keep working."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    if suffix is None:
        suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    fd, tmp = tempfile.mkstemp(prefix="." + name[: len(name) - len(suffix)] + ".", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj, **dump_kwargs):
    """``json.dump(obj)`` to ``path`` through :func:`atomic_path`; ``dump_kwargs`` default to
    ``indent=2, default=str`` (non-JSON values such as paths written as strings)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, **{"indent": 2, "default": str, **dump_kwargs})
