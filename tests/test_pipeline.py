"""End to end on the tiny preset: reproduce_table1 (train → 17-λ evaluation → Table 1 / figures), register.py
(NIfTI headers kept, bad inputs fail cleanly before any output), eval_hyper.py, and Table-1 selection logic."""
import csv
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from contrareg_tf import evaluation
from contrareg_tf.config import LAMBDAS_17, get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(lam, dice, folds):
    return {"lambda": lam, "dice": dice, "dice_std": 0.0, "dice30": dice, "folds": folds, "sdlogj": 0.1}


def test_seventeen_lambdas_dense_below_0p2():
    assert len(LAMBDAS_17) == 17 and LAMBDAS_17[0] == 0.0 and LAMBDAS_17[-1] == 1.0
    assert sum(lam < 0.2 for lam in LAMBDAS_17) > sum(lam >= 0.2 for lam in LAMBDAS_17) - 2
    assert all(b > a for a, b in zip(LAMBDAS_17, LAMBDAS_17[1:]))


def test_table1_picks_best_dice_under_fold_budget():
    rows = [_row(0.0, 0.90, 2.0), _row(0.05, 0.85, 0.6), _row(0.1, 0.80, 0.4), _row(0.2, 0.82, 0.1),
            _row(0.5, 0.70, 0.0)]
    assert evaluation.select_lambda(rows)["lambda"] == 0.2          # best Dice among folds < 0.5
    assert evaluation.select_lambda(rows, budget=1.0)["lambda"] == 0.05
    assert evaluation.select_lambda([_row(0.0, 0.9, 3.0)]) is None
    out, md = evaluation.table1({"A": rows, "B": [_row(0.0, 0.9, 3.0)]}, before=0.5)
    assert [r["method"] for r in out] == ["A", "B"] and out[0]["lambda"] == 0.2
    assert "no λ with folds" in md and "(before registration)" in md


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny end-to-end reproduction (2 methods, 2 iterations each) on the built-in proxy."""
    from contrareg_tf import experiment

    base = tmp_path_factory.mktemp("e2e")
    os.environ["CONTRAREG_CACHE"] = str(base / "cache")
    out = str(base / "table1")
    md = experiment.reproduce_table1(get_preset("tiny2d"), out, methods=["mi", "mcr"], iters=2, ae_iters=2,
                                     progress=False)
    return out, md


@pytest.mark.slow
def test_reproduce_table1_writes_table_csvs_and_figures(tiny_run):
    out, md = tiny_run
    for m in ("mi", "mcr"):
        with open(os.path.join(out, f"{m}.csv")) as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 17 and [float(r["lambda"]) for r in rows] == list(LAMBDAS_17)
        for r in rows:
            assert 0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["folds"]) <= 100.0
    with open(os.path.join(out, "table1.csv")) as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["mi", "mcr"]
    assert "| mi |" in md and "| mcr |" in md and "(before registration)" in md
    for png in ("fig3.png", "fig2.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(out, "ae_t1.h5")) and os.path.isfile(os.path.join(out, "ae_t1.json"))


@pytest.mark.slow
def test_parallel_training_workers_match_in_process_training(tiny_run, tmp_path):
    """Methods trained in spawned worker processes (reproduce_table1's default on a multi-core CPU) end with
    the same weights as the same run trained in this process; a worker's error reaches the caller."""
    import h5py

    from contrareg_tf import ContraRegInputError, experiment

    cfg = get_preset("tiny2d")
    jobs = [experiment.Table1Job(cfg, m, str(tmp_path / f"w_{m}"), dict(iters=2)) for m in ("ngf", "mi")]
    experiment._train_runs(jobs, None, progress=False, workers=2)
    experiment.train_method(cfg, "mi", str(tmp_path / "inproc_mi"), iters=2, progress=False)

    def weights(run):
        out = []
        with h5py.File(os.path.join(run, "model.h5"), "r") as f:
            f.visititems(lambda name, obj: out.append((name, obj[()])) if isinstance(obj, h5py.Dataset) else None)
        return out

    a, b = weights(str(tmp_path / "w_mi")), weights(str(tmp_path / "inproc_mi"))
    assert [n for n, _ in a] == [n for n, _ in b] and len(a) > 10
    for (name, x), (_, y) in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=name)
    assert os.path.isfile(tmp_path / "w_ngf" / "model.h5")
    # the second job into a new folder: w_ngf holds a finished run, which a new training refuses (runs.prepare_run_dir)
    bad = [experiment.Table1Job(cfg, "mcr", str(tmp_path / "bad"), dict(iters=2, ae1=str(tmp_path / "missing.h5"),
                                                                        ae2=str(tmp_path / "missing.h5"))),
           experiment.Table1Job(cfg, "ngf", str(tmp_path / "w_ngf_again"), dict(iters=2))]
    with pytest.raises(ContraRegInputError, match="missing.h5"):
        experiment._train_runs(bad, None, progress=False, workers=2)


@pytest.mark.slow
def test_evaluate_lambdas_chunks_match_a_per_pair_numpy_evaluation(tiny_run, monkeypatch):
    """The chunked (λ × pair) evaluation equals registering each pair alone at each λ and scoring it with an
    independent scipy nearest-neighbour warp + numpy Dice; chunks of 3 straddle λ boundaries."""
    from scipy.ndimage import map_coordinates

    from contrareg_tf import experiment
    from contrareg_tf.networks.hyper import register
    from contrareg_tf.runs import config_from_meta, load_trained

    out, _ = tiny_run
    model, meta = load_trained(os.path.join(out, "mi"))
    cfg = config_from_meta(meta)
    rng = np.random.default_rng(0)   # perturb the 2-step model so that warps are large and depend on λ
    for v in model.trainable_variables:
        v.assign(v + rng.normal(0.0, 0.1, v.shape).astype(np.float32))
    pairs = experiment.make_test_pairs(experiment.split_arrays(experiment.resolve_data(cfg), "test", cfg), 4)
    lams = (0.0, 0.3, 1.0)
    monkeypatch.setattr(evaluation, "_chunk_size", lambda inshape, batch_size: 3)
    rows = evaluation.evaluate_lambdas(model, pairs, lambdas=lams, batch_size=2, progress=False)
    def structures(i):   # the pair's structures: labels present in both input maps (not the background)
        return [v for v in np.intersect1d(pairs["labels1"][i], pairs["labels2"][i]) if v]

    def np_dice(fixed, moved, ids):
        return np.mean([2 * np.sum((fixed == k) & (moved == k)) / (np.sum(fixed == k) + np.sum(moved == k))
                        for k in ids])

    before = np.array([np_dice(pairs["labels1"][i], pairs["labels2"][i], structures(i))
                       for i in range(len(pairs["img1"]))])
    for lam, row in zip(lams, rows):
        dices = []
        for i in range(len(pairs["img1"])):
            _, pos, _ = register(model, pairs["img2"][i], pairs["img1"][i], lam)
            grid = np.meshgrid(*[np.arange(n) for n in pos.shape[1:-1]], indexing="ij")
            coords = [g + pos[0, ..., d] for d, g in enumerate(grid)]
            moved = map_coordinates(pairs["labels2"][i], coords, order=0, mode="nearest")
            dices.append(np_dice(pairs["labels1"][i], moved, structures(i)))
        assert row["lambda"] == lam and row["n_pairs"] == len(pairs["img1"])
        np.testing.assert_allclose(row["dice"], np.mean(dices), atol=1e-6)
        np.testing.assert_allclose(row["dice_std"], np.std(dices), atol=1e-6)
        gain = np.array(dices) - before    # paired gain over no registration
        np.testing.assert_allclose([row["gain"], row["gain_std"]], [gain.mean(), gain.std()], atol=1e-6)
        assert row["improved"] == np.mean(gain > 0)
    assert len({round(r["dice"], 6) for r in rows}) == len(lams), "warps must differ across λ for this test"


def _script(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=dict(os.environ))


def _proxy_pair():
    from contrareg_tf.data import dataset

    cache = os.environ["CONTRAREG_CACHE"]
    csvs = [os.path.join(r, f) for r, _, fs in os.walk(cache) for f in fs if f == "dataset.csv"]
    subs = dataset.load_description(csvs[0]).subjects
    return subs[0], subs[1]


@pytest.mark.slow
def test_register_cli_keeps_fixed_header_and_writes_outputs(tiny_run, tmp_path):
    out, _ = tiny_run
    a, b = _proxy_pair()
    res = [str(tmp_path / n) for n in ("moved.nii.gz", "warp.nii.gz", "inv.nii.gz", "lab.nii.gz")]
    r = _script("eval_scripts/register.py", "--model", os.path.join(out, "mcr"), "--fixed", a.t1, "--moving",
                b.t2, "--lambda", "0.1", "--moved", res[0], "--warp", res[1], "--inverse-warp", res[2],
                "--moving-labels", b.labels, "--moved-labels", res[3])
    assert r.returncode == 0, r.stderr[-2000:]
    fixed = nib.load(a.t1)
    for p in res:
        img = nib.load(p)
        np.testing.assert_allclose(img.affine, fixed.affine)
        assert img.shape[:2] == fixed.shape[:2]
    assert nib.load(res[1]).shape == fixed.shape[:2] + (2,)
    moving_ids = set(np.unique(np.asarray(nib.load(b.labels).dataobj)).tolist())
    assert set(np.unique(np.asarray(nib.load(res[3]).dataobj)).tolist()) <= moving_ids   # nearest neighbour
    # the per-pair folding budget mode picks a λ and says so
    r = _script("eval_scripts/register.py", "--model", os.path.join(out, "mcr"), "--fixed", a.t1, "--moving",
                b.t2, "--max-folds", "0.5", "--moved", str(tmp_path / "m2.nii.gz"))
    assert r.returncode == 0 and "λ =" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "not_nifti", "lambda", "shape", "nan", "bad_model"])
def test_register_cli_bad_input_is_one_clean_error_and_no_output(tiny_run, tmp_path, case):
    out, _ = tiny_run
    a, b = _proxy_pair()
    fixed, moving, lam, model = a.t1, b.t2, "0.1", os.path.join(out, "mcr")
    if case == "missing":
        moving = str(tmp_path / "nope.nii.gz")
    elif case == "not_nifti":
        moving = str(tmp_path / "text.nii.gz")
        open(moving, "w").write("not an image")
    elif case == "lambda":
        lam = "1.5"
    elif case == "shape":  # another grid is fine now (issue 12: resampled in world space); another ndim is not
        img = nib.load(b.t2)
        moving = str(tmp_path / "thick.nii.gz")
        d = np.asarray(img.dataobj).reshape(img.shape[:2])
        nib.save(nib.Nifti1Image(np.stack([d, d], -1), img.affine), moving)
    elif case == "nan":
        img = nib.load(b.t2)
        d = np.asarray(img.dataobj).astype(np.float32)
        d[5, 5] = np.nan
        moving = str(tmp_path / "nan.nii.gz")
        nib.save(nib.Nifti1Image(d, img.affine), moving)
    elif case == "bad_model":
        model = str(tmp_path)
    moved = tmp_path / "moved.nii.gz"
    r = _script("eval_scripts/register.py", "--model", model, "--fixed", fixed, "--moving", moving,
                "--lambda", lam, "--moved", str(moved))
    assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    # the library's "error: …" line, or argparse's "register.py: error: argument --lambda: …" for a value out of range
    err = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:") or ": error: argument" in ln]
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert not moved.exists()


@pytest.mark.slow
def test_eval_hyper_cli(tiny_run, tmp_path):
    out, _ = tiny_run
    r = _script("eval_scripts/eval_hyper.py", "--runs", os.path.join(out, "mi"), "--out", str(tmp_path),
                "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| mi |" in r.stdout and os.path.isfile(tmp_path / "mi.csv")


def test_train_hyper_cli_rejects_unknown_loss_and_bad_preset():
    r = _script("train_scripts/train_hyper.py", "--loss", "nope", "--out", "/tmp/x")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _script("train_scripts/train_hyper.py", "--loss", "mi", "--out", "/tmp/x", "--preset", "huge")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: unknown preset")


@pytest.mark.slow
def test_reproduce_table1_rows_one_row_of_each_set(tmp_path):
    """``--rows`` with one tiny row from each set (A2 MI, B1 SM-brains at the wide width, C4 CR+SupPretrain,
    D1 CR with 10 integration steps, extra1 CoRe): every row trained and evaluated, labelled as in the paper
    with the paper's values beside it (from config.TABLE1_ROWS), the validation curves logged, Fig. 3 drawn."""
    from contrareg_tf import experiment
    from contrareg_tf.config import TABLE1_ROWS, WIDE_FACTOR
    from contrareg_tf.runs import read_run

    os.environ["CONTRAREG_CACHE"] = str(tmp_path / "cache")
    out = str(tmp_path / "rows")
    cfg = get_preset("tiny2d")
    md = experiment.reproduce_table1(cfg, out, rows=["A2", "B1", "C4", "D1", "extra1"], iters=2, ae_iters=2,
                                     progress=False, workers=1)
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and "Method" not in ln]
    labels = [ln.split("|")[2].strip() for ln in lines[:-1]]
    assert labels == ["MI", "SM-brains", "CR+SupPretrain", "CR (10 int. steps)", "CoRe"]
    paper = {f"{r.set} {r.label}": r.paper for r in TABLE1_ROWS}
    for ln, name in zip(lines, ["A MI", "B SM-brains", "C CR+SupPretrain", "D CR (10 int. steps)"]):
        cells = [c.strip() for c in ln.split("|")[1:-1]]
        assert cells[-4:] == [f"{v:.3f}" for v in paper[name][1:]], (name, cells)
    # the wide / set-D settings reached the runs, SupPretrain's heads were the start point
    w = WIDE_FACTOR * cfg.ch
    assert read_run(os.path.join(out, f"sm-brains_ch{w}"))[0]["config"]["ch"] == w
    meta = read_run(os.path.join(out, f"cr_ch{w}_ts10"))[0]
    assert meta["config"]["ch"] == w and meta["config"]["int_steps"] == 10
    assert read_run(os.path.join(out, "cr_suppretrain"))[0]["heads_init"] == os.path.join(out, "suppretrain")
    for run in ("mi", f"sm-brains_ch{w}", "cr_suppretrain", f"cr_ch{w}_ts10", "core"):
        steps, dice = evaluation.read_val_curve(os.path.join(out, run))
        assert steps == [2] and all(0.0 <= d <= 1.0 for d in dice)       # tiny2d: a checkpoint every 2 steps
    with open(os.path.join(out, "fig3.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_table1_rows_are_the_papers_twenty_plus_three_extra():
    from contrareg_tf.config import TABLE1_ROWS

    sets = [r.set for r in TABLE1_ROWS]
    assert [sets.count(s) for s in ("A", "B", "C", "D", "extra")] == [6, 5, 6, 3, 3]
    assert all(r.paper is not None for r in TABLE1_ROWS if r.set != "extra")
    by = {(r.set, r.label): r for r in TABLE1_ROWS}
    # the paper's D3 (CR, 32 steps, width 256) is its B4 (CR, width 256): the same run here
    assert by[("D", "CR (32 int. steps)")].paper == by[("B", "CR")].paper
    assert all(r.wide for r in TABLE1_ROWS if r.set in ("B", "D"))
    assert all(0.6 < r.paper[1] < 0.8 and r.paper[2] <= r.paper[1] for r in TABLE1_ROWS if r.paper)


def test_select_rows_by_set_and_by_paper_row_number():
    from contrareg_tf import ContraRegInputError, experiment

    rows, paper = experiment.select_rows(["A5", "B"])
    assert paper and [(r.set, r.label) for r in rows] == [("A", "CR"), ("B", "SM-brains"), ("B", "SM-shapes"),
                                                          ("B", "MI"), ("B", "CR"), ("B", "mCR")]
    rows, paper = experiment.select_rows(None, methods=["mi", "ngf"])
    assert not paper and [r.method for r in rows] == ["mi", "ngf"]
    for bad in (["A7"], ["E"], ["extra4"], ["a1"], []):
        with pytest.raises(ContraRegInputError):
            experiment.select_rows(bad)


def test_row_configs_and_run_folders():
    """Sets B/D at the wide companion (× WIDE_FACTOR width, 32 steps; paper → paper-ch256); set D's steps; rows
    with the same setting share a run folder; set-A rows keep the --methods folder names."""
    from contrareg_tf import experiment
    from contrareg_tf.config import PRESETS, TABLE1_ROWS, WIDE_FACTOR

    cfg = get_preset("cpu-demo")
    by = {(r.set, r.label): r for r in TABLE1_ROWS}
    assert experiment.row_run_name(cfg, by[("A", "mCR")]) == "mcr"
    assert experiment.row_run_name(cfg, by[("C", "CR+MI+ExtNegs")]) == "cr_mi_extnegs"
    b4, d1, d3 = by[("B", "CR")], by[("D", "CR (10 int. steps)")], by[("D", "CR (32 int. steps)")]
    wide = WIDE_FACTOR * cfg.ch
    assert experiment.row_run_name(cfg, b4) == experiment.row_run_name(cfg, d3) == f"cr_ch{wide}_ts32"
    rc = experiment.row_config(cfg, d1)
    assert (rc.ch, rc.int_steps, rc.inshape) == (wide, 10, cfg.inshape)
    assert experiment.row_config(get_preset("paper"), b4) == PRESETS["paper-ch256"]
    assert experiment.row_run_name(cfg, by[("C", "mCR+RandAE")]) == "mcr_randae"
    assert experiment.row_run_name(cfg, by[("B", "SM-shapes")]) == f"sm-shapes_ch{wide}"


def test_table1_paper_columns_sit_beside_each_row():
    rows = [_row(0.0, 0.60, 0.6), _row(0.1, 0.55, 0.2)]
    for r in rows:
        r.update(gain=0.1, gain_std=0.0, improved=1.0)
    _, md = evaluation.table1({"A MI": rows, "B SM-brains": rows[1:]}, before=0.4, sets={"A MI": "A", "B SM-brains": "B"},
                              paper={"A MI": (0.175, 0.748, 0.739, 0.461, 0.089), "B SM-brains": (None, 0.755, 0.749, 0.023, 0.048)})
    lines = md.splitlines()
    assert lines[0].startswith("| Set | Method |") and lines[0].count("paper") == 5
    a = [c.strip() for c in lines[2].split("|")[1:-1]]
    b = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert a[:4] == ["A", "MI", "0.1", "0.550 ± 0.000"] and a[-5:] == ["0.175", "0.748", "0.739", "0.461", "0.089"]
    assert b[:2] == ["B", "SM-brains"] and b[-5:] == ["–", "0.755", "0.749", "0.023", "0.048"]
    assert len(a) == len(b) == 1 + 8 + 5          # set, the 8 columns of a plain row, 5 paper columns


def test_val_curve_callback_appends_and_replaces_redone_steps(tmp_path):
    from contrareg_tf.training.loop import val_curve_callback

    vals = iter([0.1, 0.2, 0.3, 0.25])
    cb = val_curve_callback(str(tmp_path), None, lambda m: next(vals))
    for step in (10, 20, 30):
        cb(step)
    cb(20)          # a resumed run from step 10 re-does step 20: rows from step 20 on are replaced
    assert evaluation.read_val_curve(str(tmp_path)) == ([10, 20], [0.1, 0.25])


@pytest.fixture
def kept_figures(monkeypatch):
    import matplotlib.pyplot as plt

    figs = []
    monkeypatch.setattr(plt, "close", figs.append)     # keep each figure to inspect it
    return figs


def test_fig3_groups_four_panels_legend_outside_distinct_colours(tmp_path, kept_figures):
    def rows(k):
        return [{"lambda": lam, "dice_cortex": 0.5 + 0.01 * k, "dice_subcortical": 0.4, "dice_ventricles": 0.3}
                for lam in (0.0, 0.5)]

    results = {f"m{k}": rows(k) for k in range(22)}
    groups = ["cortex", "subcortical", "ventricles", "cerebellum_brainstem"]
    evaluation.plot_groups(results, str(tmp_path / "g.png"), before_groups={"cortex": 0.3}, groups=groups)
    fig = kept_figures[-1]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["Dice: cortex", "Dice: subcortical", "Dice: ventricles",
                                                 "Dice: cerebellum + brainstem"]
    colours = {tuple(ln.get_color()) for ln in panels[0].get_lines() if ln.get_label().startswith("m")}
    assert len(colours) == 22
    (legend,) = fig.legends
    r = fig.canvas.get_renderer()
    assert all(legend.get_window_extent(r).x0 >= ax.get_window_extent(r).x1 - 1 for ax in panels)
    assert len(legend.get_texts()) == 23                                 # 22 methods + "before"


def test_fig2_has_a_colour_bar_and_names_whose_t2(tmp_path, kept_figures):
    rng = np.random.default_rng(0)
    ex = {"mi λ=0.1": {k: rng.random((16, 16)) for k in ("fixed", "moving", "moved", "target_t2")}}
    evaluation.plot_examples(ex, str(tmp_path / "fig2.png"))
    fig = kept_figures[-1]
    assert len(fig.axes) == 5                                            # 4 panels + the error map's colour bar
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "T2w of subject a" in titles and "T1w of subject a" in titles and "T2w of subject b" in titles
