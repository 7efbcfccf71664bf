"""Package face (contrareg_tf.assets, contrareg_tf.commands, contrareg_tf.losses): shipped weights found without
the repository layout, console commands declared for every command module, vxm-style loss imports."""
import ast
import os
import shutil
import subprocess
import sys

import pytest

from contrareg_tf import assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_models_dir_order_env_then_repo_then_installed(tmp_path, monkeypatch):
    installed = tmp_path / "share" / "contrareg_tf" / "models"
    installed.mkdir(parents=True)
    monkeypatch.delenv("CONTRAREG_MODELS", raising=False)
    assert assets.models_dir() == os.path.join(ROOT, "models")           # source checkout / editable install
    monkeypatch.setattr(assets, "_REPO_MODELS", str(tmp_path / "no_such_repo" / "models"))
    monkeypatch.setattr(assets, "_INSTALLED_MODELS", str(installed))
    assert assets.models_dir() == str(installed)                         # regular install: data_files
    monkeypatch.setenv("CONTRAREG_MODELS", str(tmp_path / "mine"))
    assert assets.shipped("dns_proxy3d.h5") == str(tmp_path / "mine" / "dns_proxy3d.h5")


def test_shipped_weights_resolve_through_assets(monkeypatch, tmp_path):
    """The DNS default weights and the preset autoencoders are looked up in models_dir(), nowhere else."""
    from contrareg_tf import experiment
    from contrareg_tf.config import get_preset
    from contrareg_tf.losses.dns import default_weights_path

    assert os.path.isfile(default_weights_path(2)) and os.path.isfile(default_weights_path(3))
    assert experiment.shipped_autoencoders(get_preset("cpu-demo")) is not None
    monkeypatch.setenv("CONTRAREG_MODELS", str(tmp_path))                # empty folder: nothing shipped
    assert default_weights_path(3) == str(tmp_path / "dns_proxy3d.h5")
    assert experiment.shipped_autoencoders(get_preset("cpu-demo")) is None


def _setup_commands():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "COMMANDS":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no COMMANDS list")


def test_every_command_module_is_a_console_script_and_every_script_wraps_one():
    mods = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "contrareg_tf", "commands"))
                  if f.endswith(".py") and f != "__init__.py")
    assert sorted(_setup_commands()) == mods
    scripts = sorted(f[:-3] for d in ("train_scripts", "eval_scripts") for f in os.listdir(os.path.join(ROOT, d))
                     if f.endswith(".py"))
    assert scripts == mods
    for d in ("train_scripts", "eval_scripts"):
        for f in os.listdir(os.path.join(ROOT, d)):
            src = open(os.path.join(ROOT, d, f)).read()
            assert "sys.path" not in src and f"contrareg_tf.commands.{f[:-3]} import cli" in src


@pytest.mark.skipif(shutil.which("contrareg-register") is None, reason="package not installed with its scripts")
def test_console_command_error_is_one_line_exit_2(tmp_path):
    r = subprocess.run(["contrareg-register", "--model", str(tmp_path / "nope"), "--fixed", "a.nii.gz",
                        "--moving", "b.nii.gz", "--lambda", "0.1", "--moved", str(tmp_path / "o.nii.gz")],
                       capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})  # as a user runs it
    assert r.returncode == 2 and r.stdout == ""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "config.json" in lines[0]
    assert not (tmp_path / "o.nii.gz").exists()


def test_losses_face_exports_vxm_style_classes():
    from contrareg_tf import losses
    from contrareg_tf.losses import MIND, NGF, MutualInformation, PatchNCE, VelocityReg
    from contrareg_tf.losses.patchnce import PatchNCE as PatchNCEModule

    assert PatchNCE is PatchNCEModule
    for cls in (MIND, NGF, MutualInformation, VelocityReg):
        assert callable(getattr(cls, "loss", None))
    import numpy as np
    x = np.random.default_rng(0).random((1, 16, 16, 1)).astype("float32")
    noise = np.random.default_rng(1).random((1, 16, 16, 1)).astype("float32")
    mi = MutualInformation()                                    # loss = −MI: an image shares most with itself
    assert float(np.mean(mi.loss(x, x))) < float(np.mean(mi.loss(x, noise)))
    assert set(losses.__all__) <= set(dir(losses))
    assert sys.modules["contrareg_tf.losses"] is losses
    import importlib                                            # a re-export must not shadow a submodule
    for name in losses.__all__:
        assert importlib.util.find_spec(f"contrareg_tf.losses.{name}") is None, name
    from contrareg_tf.losses import mind, patchnce
    assert mind.__name__ == "contrareg_tf.losses.mind" and patchnce.__name__ == "contrareg_tf.losses.patchnce"


@pytest.mark.slow
def test_wheel_install_runs_commands_with_the_shipped_weights(tmp_path):
    """A wheel built from the repository, installed without -e into a fresh venv (its dependencies borrowed
    from this environment through a .pth line, so nothing is downloaded), finds the shipped MASR-Net weights
    in <venv>/share/contrareg_tf/models: ``--loss dns`` training and IO with DNS features run from another
    folder, with no repository on the path."""
    import sysconfig

    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    src = tmp_path / "src"                                    # build from a copy: the checkout stays clean
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("contrareg_tf", "models"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    run = dict(capture_output=True, text=True, timeout=600)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "wheels")], **run)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "wheels").glob("contrareg_tf-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, **run)
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, **run).stdout.strip()
    with open(os.path.join(site, "_deps.pth"), "w") as f:     # TF, vxm, ... from this environment
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q", str(wheel)],
                       **run)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CONTRAREG_MODELS")}
    work = tmp_path / "work"
    work.mkdir()
    run.update(cwd=str(work), env=env)
    r = subprocess.run([py, "-c", "import contrareg_tf, contrareg_tf.assets as a; "
                        "print(contrareg_tf.__file__); print(a.models_dir())"], **run)
    pkg, models = r.stdout.split()
    assert pkg.startswith(str(venv)) and models == str(venv / "share" / "contrareg_tf" / "models")
    assert os.path.isfile(os.path.join(models, "dns_proxy2d.h5"))

    r = subprocess.run([str(venv / "bin" / "contrareg-train-hyper"), "--loss", "dns", "--preset", "tiny2d",
                        "--iters", "2", "--out", str(work / "run"), "--no-progress"], **run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(work / "run" / "model.h5")

    rng = np.random.default_rng(0)
    vol = ndimage.gaussian_filter(rng.random((24, 24, 24)), 2)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    for name, img in (("f.nii.gz", vol), ("m.nii.gz", np.roll(1 - vol, 1, axis=0))):
        nib.save(nib.Nifti1Image(img.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(work / name))
    r = subprocess.run([str(venv / "bin" / "contrareg-instance-opt"), "--fixed", "f.nii.gz", "--moving",
                        "m.nii.gz", "--features", "dns", "--iters", "2,2,2", "--moved", "o.nii.gz", "--quiet"],
                       **run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "features dns" in r.stdout and (work / "o.nii.gz").is_file()
