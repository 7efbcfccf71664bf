"""One line per long phase, on stderr (stdout stays the commands' results, which README quotes).

``phase("affine (ANTs)")`` prints ``affine (ANTs) …`` when the phase starts and completes the same line with its
wall time when it ends (``affine (ANTs) … 57.1 s``), so a user sees what runs before it finishes. Silenced by
``set_quiet(True)`` (the commands' ``--quiet``) or ``CONTRAREG_QUIET=1``.
"""
import contextlib
import os
import sys
import time

_QUIET = [os.environ.get("CONTRAREG_QUIET", "") not in ("", "0")]


def set_quiet(quiet):
    _QUIET[0] = bool(quiet)


def say(text):
    """One whole line on stderr (unless quiet)."""
    if not _QUIET[0]:
        print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def phase(text):
    """``text …`` now, `` 12.3 s`` when the block ends (``failed after 12.3 s`` when it raises)."""
    if _QUIET[0]:
        yield
        return
    print(f"{text} …", end="", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        yield
    except BaseException:
        print(f" failed after {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        raise
    print(f" {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
