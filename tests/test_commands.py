"""The console commands' argument parsing: help text that shows its examples as written and names only options that
exist; numeric options out of range are argparse's one usage error (exit 2) naming the option."""
import importlib
import re

import pytest

from contrareg_tf.errors import ContraRegInputError

COMMANDS = ["reproduce_table1", "train_hyper", "eval_hyper", "register", "instance_opt", "train_autoencoder",
            "train_dns"]


def _module(name):
    return importlib.import_module(f"contrareg_tf.commands.{name}")


def _parse(name, argv):
    mod = _module(name)
    return getattr(mod, "parse", None) or mod.parse_args


def _help(name, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(name, ["--help"])(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _examples(doc):
    """The example command lines of a docstring (indented lines starting with python / contrareg-), joined over
    their backslash continuations."""
    lines, out = (doc or "").splitlines(), []
    for i, line in enumerate(lines):
        if re.match(r"\s+(python|contrareg-|TF_CONFIG)", line):
            cmd = line
            while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
            out.append(cmd.strip())
    return out


def test_commands_list_matches_setup():
    setup = open("setup.py").read()
    assert re.search(r"COMMANDS = \[(.*?)\]", setup, re.S).group(1).replace("\n", "").replace(" ", "") == \
        ",".join(f'"{c}"' for c in COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_keeps_examples_and_names_only_existing_options(name, capsys):
    text = _help(name, capsys)
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text.split("options:", 1)[-1]))
    doc = _module(name).__doc__
    for example in _examples(doc):
        if "train_hyper.py" in example and name != "train_hyper":
            continue                                       # an example of another command, quoted as such
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", example):
            assert flag in options, f"{name} --help: example uses {flag}, which the command does not have"
    for line in (doc or "").splitlines():
        if re.match(r"\s+python ", line):                  # example lines keep their line breaks
            assert line.rstrip() in text, f"{name} --help lost the line {line.strip()!r}"


@pytest.mark.parametrize("name, argv, flag", [
    ("eval_hyper", ["--runs", "r", "--out", "o", "--pairs", "0"], "--pairs"),
    ("eval_hyper", ["--runs", "r", "--out", "o", "--max-folds", "-1"], "--max-folds"),
    ("eval_hyper", ["--runs", "r", "--out", "o", "--max-folds", "101"], "--max-folds"),
    ("eval_hyper", ["--runs", "r", "--out", "o", "--split", "tset"], "--split"),
    ("register", ["--model", "m", "--fixed", "f", "--moving", "v", "--moved", "o", "--lambda", "1.5"], "--lambda"),
    ("register", ["--model", "m", "--fixed", "f", "--moving", "v", "--moved", "o", "--lambda", "nan"], "--lambda"),
    ("register", ["--model", "m", "--fixed", "f", "--moving", "v", "--moved", "o", "--max-folds", "-2"],
     "--max-folds"),
    ("register", ["--model", "m", "--fixed", "f", "--moving", "v", "--moved", "o", "--lambda", "0.1",
                  "--model-spacing", "0"], "--model-spacing"),
    ("reproduce_table1", ["--iters", "0"], "--iters"),
    ("reproduce_table1", ["--pairs", "-3"], "--pairs"),
    ("reproduce_table1", ["--workers", "0"], "--workers"),
    ("reproduce_table1", ["--ae-iters", "x"], "--ae-iters"),
    ("train_autoencoder", ["--modality", "t1", "--out", "a.h5", "--iters", "0"], "--iters"),
    ("train_autoencoder", ["--modality", "t1", "--out", "a.h5", "--lr", "-1e-4"], "--lr"),
    ("train_autoencoder", ["--modality", "t1", "--out", "a.h5", "--batch-size", "0"], "--batch-size"),
    ("train_autoencoder", ["--modality", "t1", "--out", "a.h5", "--grid", "96,0,96"], "--grid"),
    ("train_autoencoder", ["--modality", "t1", "--out", "a.h5", "--spacing", "inf"], "--spacing"),
    ("train_autoencoder", ["--modality", "t1", "--out", "a.h5", "--seed", "-1"], "--seed"),
    ("train_dns", ["--out", "d.h5", "--iters", "0"], "--iters"),
    ("train_dns", ["--out", "d.h5", "--tau", "0"], "--tau"),
    ("train_dns", ["--out", "d.h5", "--crop", "32", "-32"], "--crop"),
    ("train_dns", ["--out", "d.h5", "--split", "tset"], "--split"),
])
def test_numbers_out_of_range_are_one_usage_error(name, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(name, argv)(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()

    assert f"argument {flag}" in err[-1]


@pytest.mark.parametrize("name, argv", [
    ("train_hyper", ["--loss", "mi", "--preset", "tiny3d", "--inshape", "32", "32", "32"]),
    ("train_autoencoder", ["--modality", "t1", "--preset", "tiny3d", "--data", "{data}", "--subjects", "4"]),
    ("reproduce_table1", ["--preset", "tiny3d", "--spacing", "2"]),
    ("eval_hyper", ["--runs", "r", "--spacing", "2"]),
])
def test_grid_options_need_data_and_write_nothing(name, argv, tmp_path):
    out = tmp_path / "out"
    argv = [a.replace("{data}", str(tmp_path / "d.csv")) for a in argv] + ["--out", str(out)]
    with pytest.raises(ContraRegInputError, match="--data"):
        _module(name).main(argv)
    assert not out.exists()
