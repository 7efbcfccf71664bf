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


def test_write_json_roundtrip_paths_as_strings_and_no_partial_file(tmp_path):
    import json
    import pathlib

    from contrareg_tf.atomic import write_json

    p = tmp_path / "card.json"
    write_json(p, {"b": 1, "a": pathlib.Path("/x/y.h5")}, sort_keys=True)
    assert json.loads(p.read_text()) == {"a": "/x/y.h5", "b": 1}
    assert p.read_text().index('"a"') < p.read_text().index('"b"')      # dump kwargs reach json.dump
    with pytest.raises(ValueError):
        write_json(p, {"n": float("nan")}, allow_nan=False)           # fails mid-write: old file kept
    assert json.loads(p.read_text())["b"] == 1 and sorted(os.listdir(tmp_path)) == ["card.json"]
