"""Run folders of ``train_hyper.py``: ``config.json`` (the ``Config``, loss, λ conditioning, training spacing),
``model.h5`` (registration network) and ``heads{1,2}.h5`` (PatchNCE heads), written atomically by training
and read — checked before anything is built — by inference, evaluation and the experiment runner.
"""
import dataclasses
import json
import os
import shutil

import h5py
import numpy as np
import tensorflow as tf

from .atomic import atomic_path
from .config import PAPER, Config, SynthMorphConfig
from .errors import ContraRegInputError
from .networks.hyper import build_hyper_vxm, load_registration_weights
from .networks.synthmorph import SynthMorphVxm

__all__ = ["save_trained", "save_trained_heads", "load_trained_heads", "data_spacing", "config_from_meta", "synthmorph_config", "read_run",
           "load_trained", "prepare_run_dir"]


def _save_weights(obj, out_dir, name):
    with atomic_path(os.path.join(out_dir, name)) as tmp:
        obj.save_weights(tmp)


def save_trained_heads(out_dir, heads1=None, heads2=None):
    for name, hs in (("heads1.h5", heads1), ("heads2.h5", heads2)):
        if hs is not None:
            _save_weights(_heads_container(hs), out_dir, name)


def save_trained(out_dir, model, heads1=None, heads2=None):
    """``model.h5`` (+ ``heads{1,2}.h5``), Keras ``save_weights`` format, written atomically."""
    _save_weights(model, out_dir, "model.h5")
    save_trained_heads(out_dir, heads1, heads2)


def load_trained_heads(run_dir, heads1, heads2):
    """Load ``heads1.h5``/``heads2.h5`` of ``run_dir`` (e.g. SupPretrain's) into built head sets."""
    for name, hs in (("heads1.h5", heads1), ("heads2.h5", heads2)):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            raise ContraRegInputError(f"{path}: no such heads file")
        _heads_container(hs).load_weights(path)


def _heads_container(heads):
    ins = [tf.keras.Input((h.in_channels,)) for h in heads]
    return tf.keras.Model(ins, [h(x) for h, x in zip(heads, ins)])


def data_spacing(arrays, ndim):
    """Voxel size (mm) of the training images: median over subjects of the mean voxel edge of the
    registered axes (the in-plane ones for 2-D), from the files' affines; None without affines."""
    affines = arrays.get("affines")
    if not affines:
        return None
    edges = [np.linalg.norm(np.asarray(a, np.float64)[:3, :ndim], axis=0).mean() for a in affines]
    return round(float(np.median(edges)), 6)


def config_from_meta(meta):
    """The ``Config`` a run was trained with, from its ``config.json`` (JSON lists back to tuples)."""
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})


def _mistyped(cfg):
    """``field: value (expected type)`` for each field of ``cfg`` whose value has not the type of the paper's."""
    out = []
    for f in dataclasses.fields(Config):
        want, v = type(getattr(PAPER, f.name)), getattr(cfg, f.name)
        if want is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif want is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        else:
            ok = isinstance(v, want)
        if ok and want is tuple:
            ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        if not ok:
            out.append(f"{f.name}: {v!r} (expected {want.__name__})")
    return out


def synthmorph_config(meta):
    """The ``SynthMorphConfig`` of a SynthMorph run's ``config.json`` (JSON lists back to tuples)."""
    try:
        return SynthMorphConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in (meta.get("synthmorph") or {}).items()})
    except TypeError as e:
        raise ContraRegInputError(f"config.json: 'synthmorph' does not describe a SynthMorph model ({e})") from None


def read_run(run_dir):
    """Read and check a ``train_hyper.py`` output folder before anything is built: ``config.json`` must be
    valid JSON with a complete ``config`` entry, ``model.h5`` a readable HDF5 file. Returns ``(meta, cfg)``;
    every problem is a ``ContraRegInputError`` naming the file."""
    cfg_path = os.path.join(run_dir, "config.json")
    w_path = os.path.join(run_dir, "model.h5")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise ContraRegInputError(f"{p}: not found — is {run_dir!r} a train_hyper.py output folder?")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ContraRegInputError(f"{cfg_path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ContraRegInputError(f"{cfg_path}: no 'config' entry — not written by train_hyper.py")
    try:
        cfg = config_from_meta(meta)
    except TypeError as e:
        raise ContraRegInputError(f"{cfg_path}: 'config' does not describe a model ({e})") from None
    missing = [k for k in ("inshape", "ch", "nb_levels", "int_steps") if k not in meta["config"]]
    if missing:
        raise ContraRegInputError(f"{cfg_path}: 'config' lacks {missing}: cannot rebuild the model")
    bad = _mistyped(cfg)
    if bad:
        raise ContraRegInputError(f"{cfg_path}: 'config' has values of the wrong type: {'; '.join(bad)}")
    try:
        with h5py.File(w_path, "r") as f:
            if not len(f.keys()):
                raise OSError("no weights in the file")
    except OSError as e:
        raise ContraRegInputError(f"{w_path}: not a readable Keras weights file (truncated or corrupt? {e})") \
            from None
    return meta, cfg


def load_trained(run_dir, inshape=None):
    """Rebuild a trained λ-conditioned model (or a SynthMorph run, whose λ input is ignored) from ``run_dir``
    (config.json + model.h5). ``inshape`` lets a
    fully-convolutional model run on another grid of compatible size. Returns ``(model, meta)``; a missing,
    truncated or incomplete file is a ``ContraRegInputError`` naming it."""
    meta, cfg = read_run(run_dir)
    if inshape is not None:
        cfg = dataclasses.replace(cfg, inshape=tuple(inshape))
    if meta.get("method") == "synthmorph":     # SynthMorph: one network, λ input ignored (training/synthmorph.py)
        model = SynthMorphVxm(cfg, synthmorph_config(meta))
    else:
        model = build_hyper_vxm(cfg, conditioning=meta.get("conditioning", "film"))
    w_path = os.path.join(run_dir, "model.h5")
    try:
        load_registration_weights(model, w_path)
    except (OSError, KeyError) as e:
        raise ContraRegInputError(f"{w_path}: cannot load the weights ({type(e).__name__}: {e})") from None
    return model, meta


# --------------------------------------------------------------------------------------------------------------
# a run folder's identity: what a new training may do with an existing --out
# --------------------------------------------------------------------------------------------------------------
# settings that may change when a run is resumed (how long it trains, how often it saves); every other entry of
# config.json names the run
RESUMABLE_KEYS = ("iters", "ckpt_every", "command", "heads_init", "ae1", "ae2", "data_spacing")
RUN_OUTPUTS = ("config.json", "card.json", "model.h5", "heads1.h5", "heads2.h5", "val_curve.csv",
               "monitor_curve.csv", "ckpt", "tb")


def _differences(old, new, prefix=""):
    """``key: old in the run, new now`` for every entry (nested dicts as ``config.ch``) that names the run and
    differs; both sides as JSON reads them (lists, not tuples). ``RESUMABLE_KEYS`` are skipped at the top level
    and inside ``config`` (its ``iters`` / ``ckpt_every``)."""
    out = []
    for k in sorted(set(old) | set(new)):
        if k in RESUMABLE_KEYS and prefix in ("", "config."):
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the run, {b!r} now")
    return out


def _with_field_defaults(old, new):
    """``old`` (a run's ``config.json``) whose ``config`` also has the ``Config`` fields that ``new`` records and
    ``old`` lacks, at their declared defaults: a run written before a field existed ran with that default (a later
    option such as ``hyp_activation`` does not make an old run another run)."""
    cfg, cfg_new = old.get("config"), new.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg_new, dict):
        return old
    defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}
    added = {k: v for k, v in json.loads(json.dumps(defaults)).items() if k in cfg_new and k not in cfg}
    return {**old, "config": {**cfg, **added}}


def prepare_run_dir(out_dir, meta, resume=False, overwrite=False, inputs=()):
    """Check what a training run about to write ``meta`` (its ``config.json``) into ``out_dir`` may do there,
    before anything is written. A folder holding a run (its ``config.json`` or checkpoints) is refused unless
    ``resume`` (the same run: every setting but ``RESUMABLE_KEYS`` equal — the error names each difference) or
    ``overwrite`` (its earlier outputs are removed here, after the checks). ``inputs``: files the run reads
    (autoencoders, heads, data); none may be one of its outputs. Every refusal is a ``ContraRegInputError``."""
    outs = {os.path.realpath(os.path.join(out_dir, n)) for n in RUN_OUTPUTS}
    for p in inputs:
        if p is not None and os.path.realpath(p) in outs:
            raise ContraRegInputError(f"{p}: an input of this run is one of its outputs in --out {out_dir}; "
                                      "choose another --out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ContraRegInputError(f"--out {out_dir}: exists and is not a folder")
    cfg_path = os.path.join(out_dir, "config.json")
    has_run = os.path.isfile(cfg_path) or os.path.isdir(os.path.join(out_dir, "ckpt"))
    if not has_run:
        return
    if overwrite:
        for n in RUN_OUTPUTS:
            p = os.path.join(out_dir, n)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
        return
    finished = os.path.isfile(os.path.join(out_dir, "model.h5"))
    if not resume:
        what = "a finished run" if finished else "an unfinished run"
        raise ContraRegInputError(f"--out {out_dir} holds {what}; --resume continues it, --overwrite replaces it, "
                                  "or choose another --out")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ContraRegInputError(f"{cfg_path}: cannot read the run to resume ({type(e).__name__}: {e})") from None
    new = json.loads(json.dumps(meta))
    diff = _differences(_with_field_defaults(old, new), new)
    if diff:
        raise ContraRegInputError(f"--resume {out_dir}: not the same run — " + "; ".join(diff))
