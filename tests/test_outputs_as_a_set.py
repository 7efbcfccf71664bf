"""Outputs are written as a set and environment failures are one line (the hostile-input probe's N6, N7): a
failure while writing leaves every earlier output as it was and no temporary file; an unwritable output folder is
refused before anything is computed; a full disk during training leaves no half-written checkpoint."""
import errno
import os

import numpy as np
import pytest
import tensorflow as tf

from contrareg_tf import cli
from contrareg_tf.atomic import atomic_paths
from contrareg_tf.data import io
from contrareg_tf.errors import ContraRegInputError
from contrareg_tf.training import loop


def _disk_full(path):
    with open(path, "wb") as f:
        f.write(b"half")
    raise OSError(errno.ENOSPC, "No space left on device", path)


def test_a_failed_write_keeps_the_earlier_set(tmp_path):
    paths = [tmp_path / "moved.nii.gz", tmp_path / "warp.nii.gz"]
    for p in paths:
        p.write_bytes(b"old " + p.name.encode())
    with pytest.raises(OSError):
        with atomic_paths(paths) as tmps:
            open(tmps[0], "wb").write(b"new moved")          # room for --moved ...
            _disk_full(tmps[1])                               # ... but not for --warp
    assert [p.read_bytes() for p in paths] == [b"old moved.nii.gz", b"old warp.nii.gz"]
    assert sorted(os.listdir(tmp_path)) == ["moved.nii.gz", "warp.nii.gz"]
    with atomic_paths(paths) as tmps:
        for t, p in zip(tmps, paths):
            open(t, "wb").write(b"new " + p.name.encode())
    assert [p.read_bytes() for p in paths] == [b"new moved.nii.gz", b"new warp.nii.gz"]
    assert sorted(os.listdir(tmp_path)) == ["moved.nii.gz", "warp.nii.gz"]


def test_an_unwritable_output_folder_is_refused_up_front(tmp_path, monkeypatch):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(io.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(ContraRegInputError, match=r"--warp .*warp.nii.gz: cannot write in .*Read-only file system"):
        io.check_output_paths({"--warp": str(tmp_path / "warp.nii.gz")})


def test_an_output_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "m.nii.gz").mkdir()
    with pytest.raises(ContraRegInputError, match="is a folder"):
        io.check_output_paths({"--moved": str(tmp_path / "m.nii.gz")})


@pytest.mark.parametrize("code, text", [(errno.ENOSPC, "No space left on device"),
                                        (errno.EROFS, "Read-only file system")])
def test_environment_errors_are_one_line_exit_2(code, text, capsys):
    def main(argv):
        raise OSError(code, text, "/out/moved.nii.gz")
    with pytest.raises(SystemExit) as e:
        cli.run_cli(main, [])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: /out/moved.nii.gz: {text}"]


def test_other_os_errors_still_raise():
    def main(argv):
        raise OSError(errno.EIO, "Input/output error")
    with pytest.raises(OSError):
        cli.run_cli(main, [])


def test_a_full_disk_during_training_leaves_no_temp_checkpoint(tmp_path, monkeypatch):
    ckpt = tf.train.Checkpoint(step=tf.Variable(0, dtype=tf.int64), w=tf.Variable(1.0))
    real_save = tf.train.CheckpointManager.save

    def save(self, checkpoint_number=None, **kw):
        if checkpoint_number == 4:
            os.makedirs(os.path.join(self.directory, "ckpt-4_temp"))
            raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
        return real_save(self, checkpoint_number=checkpoint_number, **kw)
    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    with pytest.raises(ContraRegInputError, match=r"cannot write checkpoint 4 .*kept: .*ckpt-2"):
        loop.run_loop(lambda b: {"loss": tf.constant(1.0)}, lambda s: {"x": np.zeros((1, 1), np.float32)}, ckpt,
                      str(tmp_path), iters=6, ckpt_every=2, progress=False)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index"]
