"""A run folder keeps its identity: a finished run is not overwritten without --overwrite, --resume refuses another
run's settings before writing anything, no output may be an input, numeric flags are range-checked, and a refused
run leaves no empty --out (the hostile-input probe's N1–N4, N12, N13)."""
import contextlib
import io
import json
import os
import shutil

import pytest
from conftest import tree_hash

from contrareg_tf import runs
from contrareg_tf.commands.train_hyper import cli
from contrareg_tf.errors import ContraRegInputError


class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def _train(*args):
    """``train_hyper.py`` in this process (its console entry point: exit status and stderr as a user sees them)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli(["--preset", "tiny2d", "--no-progress", "--no-val-curve", *args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return _Result(code, err.getvalue())


def _error_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "R")
    proc = _train("--loss", "mi", "--iters", "4", "--ckpt-every", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_a_finished_run_is_not_overwritten_without_overwrite(finished_run):
    before = tree_hash(finished_run)
    line = _error_line(_train("--loss", "mi", "--iters", "3", "--out", finished_run))   # N1
    assert "holds a finished run" in line and "--overwrite" in line
    assert tree_hash(finished_run) == before


@pytest.mark.parametrize("args, differs", [(("--loss", "mi", "--ch", "16"), "config.ch"),        # N2
                                           (("--loss", "ngf"), "loss"),                             # N4
                                           (("--loss", "mi", "--lr", "0.01"), "lr")])
def test_resume_refuses_another_run_before_writing(finished_run, args, differs):
    before = tree_hash(finished_run)
    line = _error_line(_train(*args, "--resume", "--iters", "6", "--out", finished_run))
    assert "not the same run" in line and differs in line
    assert tree_hash(finished_run) == before


def test_resume_extends_and_overwrite_replaces(tmp_path):
    out = str(tmp_path / "R")
    assert _train("--loss", "mi", "--iters", "2", "--ckpt-every", "2", "--out", out).returncode == 0
    proc = _train("--loss", "mi", "--iters", "4", "--ckpt-every", "2", "--resume", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(out, "card.json")) as f:
        assert json.load(f)["steps_run"] == 2                       # steps 3–4 only
    assert _error_line(_train("--loss", "mi", "--iters", "2", "--resume", "--overwrite", "--out", out))
    proc = _train("--loss", "ngf", "--iters", "2", "--overwrite", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["loss"] == "ngf"
    assert sorted(os.listdir(os.path.join(out, "ckpt"))) == ["checkpoint", "ckpt-2.data-00000-of-00001",
                                                             "ckpt-2.index"]


def test_no_output_is_an_input(tmp_path):                            # N3
    sp = str(tmp_path / "SP")
    assert _train("--loss", "cr", "--rand-ae", "--iters", "2", "--out", sp).returncode == 0
    before = tree_hash(sp)
    line = _error_line(_train("--loss", "cr", "--rand-ae", "--heads", sp, "--iters", "2", "--out", sp))
    assert "is one of its outputs" in line and "heads1.h5" in line
    assert tree_hash(sp) == before


@pytest.mark.parametrize("flag, value", [("--lr", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--batch-size", "0"),
                                         ("--iters", "0"), ("--ckpt-every", "0"), ("--seed", "-1"),
                                         ("--ch", "0"), ("--num-patches", "0"), ("--int-steps", "1000")])
def test_numeric_flags_out_of_range_exit_2_naming_the_flag(tmp_path, flag, value):      # N12
    out = tmp_path / "R"
    proc = _train("--loss", "mi", flag, value, "--out", str(out))
    assert proc.returncode == 2 and f"argument {flag}" in proc.stderr
    assert not out.exists()


def test_a_refused_run_leaves_no_empty_out(tmp_path):                # N13
    out = tmp_path / "new" / "R"
    line = _error_line(_train("--loss", "cr", "--ae1", str(tmp_path / "missing.h5"), "--ae2",
                              str(tmp_path / "missing.h5"), "--iters", "2", "--out", str(out)))
    assert "missing.h5" in line
    assert not out.exists()


def test_prepare_run_dir_lists_every_difference(tmp_path):
    meta = {"config": {"ch": 8, "iters": 4, "lr": 1e-3}, "loss": "mi", "lr": 1e-3, "iters": 4, "command": "a"}
    os.makedirs(tmp_path / "ckpt")
    (tmp_path / "config.json").write_text(json.dumps(meta))
    same = dict(meta, iters=40, command="b", config=dict(meta["config"], iters=40))
    runs.prepare_run_dir(str(tmp_path), same, resume=True)          # iters / command may change
    other = dict(meta, loss="ngf", config=dict(meta["config"], ch=16))
    with pytest.raises(ContraRegInputError, match=r"config\.ch: 8 in the run, 16 now; loss: 'mi' in the run"):
        runs.prepare_run_dir(str(tmp_path), other, resume=True)
    with pytest.raises(ContraRegInputError, match="unfinished run"):
        runs.prepare_run_dir(str(tmp_path), meta)


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path):      # N8
    out = str(tmp_path / "R")
    assert _train("--loss", "mi", "--iters", "6", "--ckpt-every", "2", "--out", out).returncode == 0
    data = os.path.join(out, "ckpt", "ckpt-6.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    proc = _train("--loss", "mi", "--iters", "8", "--ckpt-every", "2", "--resume", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warn = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "ckpt-6" in warn[0]
    with open(os.path.join(out, "card.json")) as f:
        assert json.load(f)["steps_run"] == 4                       # steps 5–8, from ckpt-4


def test_out_that_is_a_file_and_a_garbled_lock_are_one_error_line(tmp_path):   # N16
    f = tmp_path / "file"
    f.write_text("x")
    assert "not a folder" in _error_line(_train("--loss", "mi", "--iters", "2", "--out", str(f)))
    out = tmp_path / "R"
    out.mkdir()
    (out / "train.lock").write_text('{"pid": "abc", "host": "h"}')
    assert "unreadable lock file" in _error_line(_train("--loss", "mi", "--iters", "2", "--out", str(out)))


def test_a_config_json_with_a_wrongly_typed_value_is_refused_naming_it(finished_run, tmp_path):   # N16
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    meta = json.loads((run / "config.json").read_text())
    meta["config"]["ch"] = "four"
    (run / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ContraRegInputError, match=r"config.json: 'config' has values of the wrong type: ch: 'four'"):
        runs.read_run(str(run))
    runs.read_run(finished_run)                                      # the untouched run reads


def test_a_collapsed_lambda_conditioning_is_a_warning_and_in_the_card(tmp_path, monkeypatch):   # N18
    from contrareg_tf.training import registration

    monkeypatch.setattr(registration, "lambda_use", lambda model: {"units": 16, "flat_up_to": 1.0,
                                                                   "active_first_layer": {}})
    out = str(tmp_path / "R")
    proc = _train("--loss", "mi", "--iters", "2", "--out", out)
    assert proc.returncode == 0
    assert any(ln.startswith("warning:") and "collapsed" in ln for ln in proc.stderr.splitlines())
    with open(os.path.join(out, "card.json")) as f:
        assert "collapsed" in json.load(f)["warnings"][0]
