"""atomic_path: success replaces the target; a failure leaves the old file intact and no temporary behind."""
import os

import pytest

from contrareg_tf.atomic import atomic_path


def test_success_replaces_and_failure_keeps_old(tmp_path):
    p = tmp_path / "out.nii.gz"
    p.write_text("old")
    with atomic_path(p) as tmp:
        assert tmp.endswith(".nii.gz") and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "w").write("new")
    assert p.read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            open(tmp, "w").write("partial")
            raise RuntimeError("boom")
    assert p.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out.nii.gz"]
