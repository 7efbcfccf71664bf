"""Atomic file writes: every output of the package goes through ``atomic_path`` so that a failure (bad input
found late, a crash, Ctrl-C, a full disk) never leaves a partial file behind; ``atomic_paths`` writes several
outputs as a set (all replaced, or none)."""
import contextlib
import json
import os
import tempfile


def _suffix(name):
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path`` (mode 0644), on any
    exception it is removed and the exception propagates. ``suffix`` (default: ``path``'s extension, with
    ``.nii.gz`` kept whole) lets writers that pick the format from the file name keep working."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    if suffix is None:
        suffix = _suffix(name)
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


@contextlib.contextmanager
def atomic_paths(paths):
    """``atomic_path`` for a set of outputs: yields one temporary path per path (same folder, same extension);
    only when every one was written are they moved into place, so a failure while writing (a full disk, Ctrl-C)
    leaves every earlier output as it was and no temporary file. (The final renames are not one atomic step,
    but each is, and nothing can fail between them short of a crash.)"""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(p)) for p in paths]
        # ExitStack exits in reverse order: each atomic_path replaces its file on success, removes it on error


def write_json(path, obj, **dump_kwargs):
    """``json.dump(obj)`` to ``path`` through :func:`atomic_path`; ``dump_kwargs`` default to
    ``indent=2, default=str`` (non-JSON values such as paths written as strings)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, **{"indent": 2, "default": str, **dump_kwargs})
