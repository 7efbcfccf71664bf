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


def test_itk_export_refuses_a_sheared_fixed_grid(tmp_path):                      # N15
    from contrareg_tf.data.itk import check_itk_export
    from contrareg_tf.data.io import Volume

    sheared = np.diag([1.0, 1.0, 1.0, 1.0])
    sheared[0, 1] = 0.3                                                        # x picks up 0.3 mm per y voxel
    rotated = np.eye(4)
    rotated[:3, :3] = [[0, -2, 0], [1, 0, 0], [0, 0, 1.5]]                     # permuted, scaled: orthogonal
    vol = lambda a, shape=(4, 4, 4): Volume(data=np.zeros(shape, np.float32), affine=a, header=None, path="f.nii.gz")
    check_itk_export(vol(rotated))
    with pytest.raises(ContraRegInputError, match="f.nii.gz has a sheared affine"):
        check_itk_export(vol(sheared))
    with pytest.raises(ContraRegInputError, match="3-D only"):
        check_itk_export(vol(np.eye(4), (4, 4)))


def test_negative_and_empty_label_maps_are_refused_naming_the_file(tmp_path):     # N17
    import nibabel as nib

    from contrareg_tf.data.dataset import Subject, load_subject

    img = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    files = {}
    for name, arr in (("t1", img), ("t2", img), ("neg", np.full((8, 8, 8), -1, np.int16)),
                      ("zero", np.zeros((8, 8, 8), np.int16))):
        files[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(arr, np.eye(4)), files[name])
    with pytest.raises(ContraRegInputError, match=r"neg.nii.gz: label map must hold labels ≥ 0"):
        io.load_labels(files["neg"])
    with pytest.raises(ContraRegInputError, match=r"zero.nii.gz: subject 's1': the label map has no structure"):
        load_subject(Subject("s1", files["t1"], files["t2"], files["zero"]))
