"""A lock file for a training output folder: one training process per ``--out``.

``OUT/train.lock`` holds JSON ``{"pid", "host", "started", "command"}`` of the holder. It is created
atomically with its content (written to a temporary file, then ``os.link``-ed to the lock name, which fails if
the name exists), so a reader never sees a half-written lock.

* A second process finds the lock and raises ``ContraRegInputError`` naming the holder (PID and host), which
  the scripts turn into one ``error:`` line and exit 2.
* A **stale** lock — same host, PID no longer running — is taken over with a ``warning:`` line on stderr.
  A lock from another host cannot be checked from here: it is refused, and the message says to delete the
  file if that run is known to be dead. A lock file that is not valid JSON is refused the same way.
* Multi-worker training (``--strategy multiworker``): all workers of a run share ``--out``, but only the chief
  writes into it; the chief holds ``train.lock`` and each other worker a lock of its own task,
  ``train.lock.worker1`` etc. (:func:`set_worker`, called when the process creates its multi-worker strategy),
  so a second copy of the same task is refused the same way.
* Re-entrant within one process: the holder may lock the same folder again (e.g. ``train_hyper.py`` locks
  ``--out`` and ``training.train_hyper`` locks it again); only the outermost release removes the file.
"""
import contextlib
import json
import os
import socket
import sys
import tempfile
import time

from .errors import ContraRegInputError

LOCK_NAME = "train.lock"
_HELD = {}  # lock path -> depth of re-entrant holds in this process
_WORKER = []  # this process's task in a multi-worker cluster when it is not the chief ("worker1"), else empty


def set_worker(task):
    """This process is the non-chief task ``task`` (e.g. ``"worker1"``) of a multi-worker run: its locks are
    named ``train.lock.<task>`` from now on (``None``: back to ``train.lock``)."""
    _WORKER[:] = [task] if task else []


def lock_name() -> str:
    """``train.lock``, or ``train.lock.<task>`` on a non-chief worker of a multi-worker run."""
    return f"{LOCK_NAME}.{_WORKER[0]}" if _WORKER else LOCK_NAME


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _read(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        ok = isinstance(info, dict) and isinstance(info.get("pid"), int) and isinstance(info.get("host"), str)
        return info if ok else None   # None: unreadable, named in the caller's error
    except (OSError, ValueError):
        return None


def _create(path: str, info: dict) -> bool:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".train.lock.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        os.remove(tmp)


def acquire(out_dir, command=None) -> str:
    """Take the lock of ``out_dir`` (created if missing) for this process; returns the lock path."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ContraRegInputError(f"--out {out_dir}: exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(out_dir, lock_name()))
    if path in _HELD:
        _HELD[path] += 1
        return path
    host = socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}
    for _ in range(3):
        if _create(path, info):
            _HELD[path] = 1
            return path
        held = _read(path)
        if held is None:
            raise ContraRegInputError(f"{path}: unreadable lock file in the output folder; if no training run "
                                      f"uses {out_dir}, delete it")
        if held["host"] == host and int(held["pid"]) == os.getpid():
            _HELD[path] = 1
            return path
        if held["host"] == host and not _alive(int(held["pid"])):
            print(f"warning: taking over the stale lock {path} of PID {held['pid']} on {host} (no longer "
                  f"running, started {held.get('started')})", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        where = "this host" if held["host"] == host else f"host {held['host']}"
        raise ContraRegInputError(
            f"{out_dir} is in use by another training run: PID {held['pid']} on {where} (started "
            f"{held.get('started')}, lock {path}); choose another --out, or delete the lock if that run is dead")
    raise ContraRegInputError(f"{path}: could not take the lock (another process keeps re-creating it)")


def release(path: str):
    """Release a lock taken by :func:`acquire` (the file is removed at the outermost release)."""
    depth = _HELD.get(path, 0) - 1
    if depth > 0:
        _HELD[path] = depth
        return
    _HELD.pop(path, None)
    held = _read(path)
    if held is not None and int(held["pid"]) == os.getpid() and held["host"] == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def out_dir_lock(out_dir, command=None):
    """``with out_dir_lock(out):`` — hold the lock of ``out`` for the block (released on any exit). A folder the
    lock created is removed again when the block leaves it empty (a run refused or failed before writing)."""
    created = not os.path.isdir(out_dir)
    path = acquire(out_dir, command)
    try:
        yield path
    finally:
        release(path)
        if created:
            with contextlib.suppress(OSError):   # not empty: the run wrote something, which stays
                os.rmdir(out_dir)
