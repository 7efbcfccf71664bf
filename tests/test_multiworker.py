"""``train_hyper.py --strategy multiworker``: two worker processes on 127.0.0.1 (``MultiWorkerMirroredStrategy``,
cluster from ``TF_CONFIG``) end with the weights of single-process training with the same global batch, only the
chief writes into ``--out``, and ``--resume`` continues both workers from the chief's checkpoint."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from contrareg_tf.config import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, MORE = 3, 2            # N steps, then --resume to N + 2
WORKER_SECONDS = 150          # each worker stops by itself after this (coreutils timeout), the test kills it too


def _free_ports(n):
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run_workers(out, iters, logs, resume=False):
    """The two commands of the README, one per worker, concurrently; returns their exit codes and stderr."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    cmd = ["timeout", "-k", "5", str(WORKER_SECONDS), sys.executable,
           os.path.join(ROOT, "train_scripts", "train_hyper.py"), "--loss", "mi", "--preset", "tiny2d",
           "--iters", str(iters), "--batch-size", "2", "--strategy", "multiworker", "--no-progress", "--out", out]
    cmd += ["--resume"] if resume else []
    procs, errs = [], []
    try:
        for i in range(2):
            tmp = logs / f"tmp{i}"
            tmp.mkdir(exist_ok=True)
            env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmp),
                       TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
            err = open(logs / f"worker{i}.{iters}.err", "w+")
            errs.append(err)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err))
        codes = [p.wait(timeout=WORKER_SECONDS + 10) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        texts = []
        for e in errs:
            e.seek(0)
            texts.append(e.read())
            e.close()
    return codes, texts


def _weights(run):
    import h5py

    out = {}
    with h5py.File(os.path.join(run, "model.h5"), "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, np.array(o)) if isinstance(o, h5py.Dataset) else None)
    return out


def _assert_same_weights(run, ref):
    got, want = _weights(run), _weights(ref)
    assert sorted(got) == sorted(want) and len(want) > 10
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_two_workers_match_single_process_and_resume_from_chief(tmp_path, monkeypatch):
    from contrareg_tf import experiment, runs
    from contrareg_tf.training.loop import run_loop
    from contrareg_tf.training.registration import setup_registration

    monkeypatch.setenv("CONTRAREG_CACHE", str(tmp_path / "cache"))   # built once here, read by the workers
    monkeypatch.delenv("TF_CONFIG", raising=False)
    cfg = get_preset("tiny2d")
    # the reference: one uninterrupted single-process run, global batch 2, weights saved after N and N + 2 steps
    arrays = experiment.split_arrays(experiment.resolve_data(cfg, None), "train", cfg)
    s = setup_registration(cfg, "mi", arrays, batch_size=2)
    refs = {}
    for n in (STEPS, STEPS + MORE):
        run_loop(s.step, s.sampler.batch, s.ckpt, None, n, cfg.ckpt_every, s.strategy, progress=False)
        refs[n] = str(tmp_path / f"single{n}")
        os.makedirs(refs[n])
        runs.save_trained(refs[n], s.model)

    out = str(tmp_path / "mw")
    codes, errs = _run_workers(out, STEPS, tmp_path)
    assert codes == [0, 0], "\n---\n".join(e[-3000:] for e in errs)
    _assert_same_weights(out, refs[STEPS])
    # the chief alone wrote --out (no worker lock left, no worker checkpoint, one validation curve); worker 1's
    # temporary checkpoint folder is gone
    assert sorted(os.listdir(out)) == ["card.json", "ckpt", "config.json", "model.h5", "tb", "val_curve.csv"]
    assert os.listdir(tmp_path / "tmp1") == []
    with open(os.path.join(out, "card.json")) as f:
        assert json.load(f)["steps_run"] == STEPS

    codes, errs = _run_workers(out, STEPS + MORE, tmp_path, resume=True)
    assert codes == [0, 0], "\n---\n".join(e[-3000:] for e in errs)
    with open(os.path.join(out, "card.json")) as f:
        assert json.load(f)["steps_run"] == MORE        # continued from step N, not restarted
    _assert_same_weights(out, refs[STEPS + MORE])
    assert os.listdir(tmp_path / "tmp1") == []


def test_non_chief_worker_takes_a_lock_of_its_own(tmp_path):
    """The chief holds OUT/train.lock, worker 1 OUT/train.lock.worker1; both are removed on release (and the
    folder the lock created with them)."""
    from contrareg_tf import lock

    out = str(tmp_path / "run")
    with lock.out_dir_lock(out) as chief:
        try:
            lock.set_worker("worker1")
            with lock.out_dir_lock(out) as worker:
                assert sorted(os.listdir(out)) == ["train.lock", "train.lock.worker1"]
                assert (os.path.basename(chief), os.path.basename(worker)) == ("train.lock", "train.lock.worker1")
        finally:
            lock.set_worker(None)
        assert os.listdir(out) == ["train.lock"]
    assert not os.path.exists(out)      # the lock created the folder and it was left empty: removed again


@pytest.mark.parametrize("tf_config", ['{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", '
                                       '"index": 3}}', "{not json"])
def test_bad_tf_config_is_one_error_line(tmp_path, monkeypatch, capsys, tf_config):
    from contrareg_tf.commands import train_hyper

    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(SystemExit) as e:
        train_hyper.cli(["--loss", "mi", "--preset", "tiny2d", "--strategy", "multiworker", "--out",
                         str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: TF_CONFIG")
    assert not os.path.exists(tmp_path / "x")
