"""Instance optimisation (IO): pyramid Adam registration over structural descriptors (DNS paper, CVPR 2024, §3.4,
supplementary Table 4), one method per module:

* ``features.py`` — descriptor maps (MIND-SSC, MIND, DNS, ContraReg autoencoders), ψ_σ and level resizing;
* ``convex.py`` — the optional coupled-convex discrete start (convexAdam's scheme);
* ``solver.py`` — the pyramid Adam solver, ``instance_optimise(fixed, moving, features, schedule: IOConfig)``;
* ``decision.py`` — whether the deformable stage is kept (``IOConfig.deformable``: auto / on / off);
* ``memory.py`` — the up-front memory estimate of an IO job;
* ``files.py`` — a NIfTI pair end to end (physical space, phases with their times, outputs as a set).

Schedules are ``config.IO_PRESETS`` ('paper' = Table 4, 'fast', 'convex'); the shifts, box filter, warp and
resizing are ``ops``.
"""
from .convex import (check_cells, check_convex, convex_cells, convex_init_fn, convex_offsets, convex_param,
                     convex_start, cost_volume, coupled_convex, inverse_consistent, pool_features)
from .decision import DEFORMABLE_MODES, cosine_dissimilarity, data_term, keep_deformable
from .features import (AA_SIGMA, FEATURE_NAMES, FeatureSpec, _pad8, ae_features, as_spec, dns_weights_path,
                       feature_maps, feature_provider)
from .solver import (IO_ITERS, IO_LEVELS, IO_LRS, IO_MIN_SCALE, IO_REG_WEIGHTS, IO_SMOOTH_SIGMA, IOResult,
                     _LevelSolver, _SOLVERS, check_io, check_schedule, instance_optimise, level_shapes)

_feature_maps = feature_maps   # the name the tests of the descriptor maps use

__all__ = ["instance_optimise", "check_schedule", "check_io", "convex_init_fn", "convex_cells", "cost_volume",
           "coupled_convex", "inverse_consistent", "pool_features", "convex_offsets", "convex_start", "check_convex",
           "check_cells", "convex_param", "IOResult", "FeatureSpec", "as_spec", "feature_provider", "feature_maps",
           "ae_features", "dns_weights_path", "level_shapes", "data_term", "keep_deformable", "cosine_dissimilarity",
           "DEFORMABLE_MODES", "FEATURE_NAMES", "AA_SIGMA", "IO_LRS", "IO_ITERS", "IO_REG_WEIGHTS", "IO_LEVELS",
           "IO_SMOOTH_SIGMA", "IO_MIN_SCALE"]
