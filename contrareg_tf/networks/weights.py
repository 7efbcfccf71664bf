"""Keras ``.h5`` weights files: the one topology check for every model the package loads (autoencoders, the
λ-conditioned registration network, MASR-Net), and JSON attributes stored beside the weights.

Layers are matched in order, like Keras' (topological) ``load_weights``: layer names may differ (so a file
written by a tfa-``InstanceNormalization`` model of the same topology loads); the number of layers with
weights, the number of weights per layer and every weight shape must agree. A mismatch raises one
``ContraRegInputError`` naming the file and the first difference, before Keras reads anything.
"""
import json
import os

import h5py

from ..errors import ContraRegInputError

__all__ = ["file_layers", "model_layers", "check_weights_file", "load_weights", "read_json_attr",
           "write_json_attr"]


def _str(s):
    return s.decode("utf8") if isinstance(s, bytes) else str(s)


def _open(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ContraRegInputError(f"{path}: weights file not found")
    if not h5py.is_hdf5(path):
        raise ContraRegInputError(f"{path}: not an HDF5 weights file")
    return h5py.File(path, "r")


def file_layers(path):
    """[(layer name, [(weight name, shape)])] for the layers with weights in a Keras .h5 file (weights-only
    or a full ``model.save`` file)."""
    with _open(path) as f:
        g = f
        if "layer_names" not in g.attrs and "model_weights" in g:   # full-model .h5 (model.save)
            g = g["model_weights"]
        if "layer_names" not in g.attrs:
            raise ContraRegInputError(f"{os.fspath(path)}: not a Keras HDF5 weights file (no 'layer_names')")
        out = []
        for lname in (_str(n) for n in g.attrs["layer_names"]):
            wnames = [_str(w) for w in g[lname].attrs.get("weight_names", [])]
            if wnames:
                out.append((lname, [(w, tuple(g[lname][w].shape)) for w in wnames]))
    return out


def model_layers(model):
    """Same listing for a model, in Keras' h5 order (trainable then non-trainable weights per layer)."""
    out = []
    for layer in model.layers:
        ws = layer.trainable_weights + layer.non_trainable_weights
        if ws:
            out.append((layer.name, [(w.name, tuple(w.shape)) for w in ws]))
    return out


def check_weights_file(model, path):
    """Raise ``ContraRegInputError`` naming the first mismatch between the file and ``model``; else None."""
    path = os.fspath(path)
    found, expected = file_layers(path), model_layers(model)
    for i, ((mname, mw), (fname, fw)) in enumerate(zip(expected, found)):
        where = f"layer {i} '{mname}'" + ("" if fname == mname else f" (file layer '{fname}')")
        if len(mw) != len(fw):
            raise ContraRegInputError(f"{path}: wrong topology: {where}: expected {len(mw)} weights, "
                                      f"found {len(fw)}")
        for (wm, sm), (wf, sf) in zip(mw, fw):
            if sm != sf:
                raise ContraRegInputError(
                    f"{path}: wrong topology: {where}: weight '{wm.split('/')[-1]}' expected shape {sm}, "
                    f"found {sf} — the file was written by a model of a different topology")
    if len(found) != len(expected):
        raise ContraRegInputError(f"{path}: wrong topology: file has {len(found)} layers with weights, model "
                                  f"'{model.name}' has {len(expected)}")


def load_weights(model, path):
    """``model.load_weights(path)`` after :func:`check_weights_file`. Returns the model."""
    check_weights_file(model, path)
    model.load_weights(os.fspath(path))
    return model


def read_json_attr(path, key):
    """The JSON object stored as HDF5 attribute ``key`` of the file (None when absent)."""
    with _open(path) as f:
        raw = f.attrs.get(key)
    return None if raw is None else json.loads(raw)


def write_json_attr(path, key, obj):
    with h5py.File(os.fspath(path), "a") as f:
        f.attrs[key] = json.dumps(obj)
