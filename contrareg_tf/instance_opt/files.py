"""Instance optimisation of one NIfTI pair end to end (``contrareg-instance-opt``): every argument, input and output
path checked and the memory estimated before anything is loaded, the pair brought into physical space
(``data/physical.py``: the fixed image's canonical grid, the moving image resampled onto it through world
coordinates, after an ANTs affine with ``affine='ants'``), optimised there (``solver.py``), then written on the
fixed image's own grid (``inference.write_outputs``).

With ``progress``, one line per phase with its time on stderr (``contrareg_tf.progress``): loading + resampling
(with the ANTs affine inside it when asked; printed when done, so that a bad input stays the one stderr line), the
DNS weights file used, descriptors, convex start, optimisation, the deformable decision, writing.
"""
import contextlib
import dataclasses
import os
import time
from typing import Optional

import nibabel as nib
import numpy as np

from .. import metrics
from ..config import IO_PAPER, IOConfig
from ..data.io import check_output_paths, normalize_intensity
from ..data.itk import check_itk_export
from ..data.physical import load_pair, voxel_spacing
from ..errors import ContraRegInputError
from ..inference import RegistrationResult, warn_if_folding, write_outputs
from ..networks.masr import check_training_spacing, training_spacing
from ..progress import phase, say
from .features import FeatureSpec, dns_weights_path
from .memory import check_memory
from .solver import IOResult, check_io, instance_optimise


@dataclasses.dataclass
class IOFileResult(RegistrationResult):
    """``instance_opt_files``' result: the registration plus the optimiser's report and, with fixed labels,
    mean Dice before / after the affine (``None`` without ``--affine ants``) / after."""
    io: Optional[IOResult] = None
    sdlogj: float = float("nan")
    dice_before: Optional[float] = None
    dice_affine: Optional[float] = None
    dice_after: Optional[float] = None


def _header_shape(path):
    """The spatial shape in ``path``'s header (nothing read but the header), or None when it cannot be read (the
    loader then names the problem)."""
    try:
        return tuple(int(n) for n in nib.load(os.fspath(path)).shape[:3] if int(n) > 1) or None
    except Exception:  # noqa: BLE001 — any unreadable file is reported by the loader, with its name
        return None


def instance_opt_files(fixed, moving, features="mindssc", moved_out=None, warp_out=None, inverse_warp_out=None,
                       moving_labels=None, moved_labels_out=None, fixed_labels=None, itk_warp_out=None,
                       affine="none", normalize=True, dns_model=None, ae1=None, ae2=None, moving_modality="t1",
                       schedule: IOConfig = IO_PAPER, progress=True) -> IOFileResult:
    """File-level instance optimisation (module docstring). ``schedule``: the ``IOConfig`` to run (a preset of
    ``config.IO_PRESETS`` with the user's overrides); ``progress``: the bar and the phase lines.
    Raises ``ContraRegInputError`` (nothing written) on any bad input, before the work starts."""
    step = phase if progress else (lambda text: contextlib.nullcontext())
    note = say if progress else (lambda text: None)
    if moved_labels_out and not moving_labels:
        raise ContraRegInputError("--moved-labels needs --moving-labels")
    if fixed_labels and not moving_labels:
        raise ContraRegInputError("--fixed-labels (Dice) needs --moving-labels")
    if inverse_warp_out and not schedule.diffeomorphic:
        raise ContraRegInputError("--inverse-warp needs --diffeomorphic")
    inputs = {"--fixed": fixed, "--moving": moving, "--moving-labels": moving_labels,
              "--fixed-labels": fixed_labels, "--dns-model": dns_model, "--ae1": ae1, "--ae2": ae2}
    check_output_paths({"--moved": moved_out, "--warp": warp_out, "--inverse-warp": inverse_warp_out,
                        "--moved-labels": moved_labels_out, "--itk-warp": itk_warp_out}, inputs)
    check_io(schedule)
    needed = {"dns": [("--dns-model", dns_model)] if dns_model is not None else [],
              "ae": [("--ae1", ae1), ("--ae2", ae2)]}.get(features, [])
    for arg, path in needed:
        if path is None:
            raise ContraRegInputError(f"--features {features} needs {arg}")
        if not os.path.isfile(path):
            raise ContraRegInputError(f"{arg} {path}: file not found")
    shape = _header_shape(fixed)
    if shape is not None and schedule.deformable != "off":
        check_memory(shape, features, schedule, schedule.name)

    t0 = time.perf_counter()     # timed, not announced: a bad input here must stay the only stderr line
    pair = load_pair(fixed, moving, moving_labels=moving_labels, fixed_labels=fixed_labels, affine=affine)
    if itk_warp_out:
        check_itk_export(pair.fixed)
    check_io(schedule, pair.fixed_c.shape)
    fx, mv = pair.fixed_c, pair.moving_c
    if normalize:
        fx, mv = normalize_intensity(fx), normalize_intensity(mv)
    spacing = voxel_spacing(pair.affine_c)
    note(f"load + resample onto the fixed grid {'x'.join(map(str, fx.shape))} @ {'x'.join(f'{s:g}' for s in spacing)} "
         f"mm{' (ANTs affine included)' if affine == 'ants' else ''}: {time.perf_counter() - t0:.1f} s")
    spec = FeatureSpec(features, dns_model=dns_model, ae_models=(ae1, ae2) if features == "ae" else None,
                       moving_modality=moving_modality)
    if features == "dns":
        path = dns_weights_path(dns_model, pair.ndim)
        trained = training_spacing(path)
        note(f"DNS weights: {path}" + (f" (trained at {'x'.join(f'{s:g}' for s in trained)} mm)" if trained else ""))
        check_training_spacing(path, spacing)
    io = instance_optimise(fx[None, ..., None], mv[None, ..., None], spec, schedule, progress=progress)

    warp = pair.total_warp(io.disp[0])
    jac = metrics.jacobian_determinant(warp)
    res = IOFileResult(moved=pair.moved(warp), warp=warp, inverse_warp=None, lam=float("nan"),
                       folds=float(metrics.folding_fraction(jac)), io=io, sdlogj=float(metrics.std_log_jacobian(jac)))
    if inverse_warp_out:
        res.inverse_warp = pair.total_inverse_warp(io.inverse[0])
    if pair.moving_labels is not None:
        res.moved_labels = pair.moved_labels(warp)
    if pair.fixed_labels is not None:
        flab = pair.fixed_labels.data
        no_warp = np.zeros(pair.fixed.shape + (pair.ndim,), np.float32)  # world-space identity
        res.dice_before = float(metrics.mean_dice(flab, pair.moved_labels(no_warp)))
        if affine == "ants":
            res.dice_affine = float(metrics.mean_dice(flab, pair.moved_labels(pair.total_warp(None))))
        res.dice_after = float(metrics.mean_dice(flab, res.moved_labels))
    written = [p for p in (moved_out, warp_out, inverse_warp_out, moved_labels_out, itk_warp_out) if p]
    with step(f"writing {len(written)} output(s)") if written else contextlib.nullcontext():
        write_outputs(pair, res, moved_out, warp_out, inverse_warp_out, moved_labels_out, itk_warp_out)
    warn_if_folding(res.folds, f"too high a learning rate (--lrs {','.join(f'{v:g}' for v in np.atleast_1d(schedule.lrs))}) "
                               f"or too low a regularisation weight (--reg-weights "
                               f"{','.join(f'{v:g}' for v in np.atleast_1d(schedule.reg_weights))})")
    return res


def with_overrides(preset: IOConfig, **overrides) -> IOConfig:
    """``preset`` with every override that is not None (the command's explicit flags); lists become tuples."""
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
    unknown = set(kw) - {f.name for f in dataclasses.fields(IOConfig)}
    if unknown:
        raise ContraRegInputError(f"unknown schedule settings {sorted(unknown)}")
    return dataclasses.replace(preset, **kw)
