"""Data: NIfTI io and preprocessing, data-set descriptions, the built-in data sets (real ICBM 2009c T1w/T2w +
CerebrA by default, ``python -m contrareg_tf.data build`` writes one to a folder; ``proxy_stats`` summarises
one), which data set a job uses (``sources.resolve``), the one per-subject loader (``dataset.load_subject``),
a user's scans on the model grid (``grid``), inter-subject pairs (``pairs.make_pairs`` for evaluation,
``pairs.PairSampler`` for training) and augmentation."""
from .io import (Volume, CropInfo, load_nifti, save_nifti, check_same_shape, check_nonempty_mask,  # noqa: F401
                 normalize_intensity, crop_or_pad, uncrop, foreground_mask)
from .dataset import (Subject, Description, load_description, write_description, split_counts,  # noqa: F401
                      assign_splits, SPLITS, load_images, load_subject)
from .proxy import (build_proxy, default_cache_dir, true_pair_warp, integrate_svf, random_svf,  # noqa: F401
                    proxy_dir, nilearn_data_dir, LABEL_NAMES, SOURCES, template, label_info, augment_contrast)
from .grid import FitInfo, fit_subject, fit_line, fit_warning, grid_config  # noqa: F401
from .pairs import (make_pairs, load_split_arrays, pair_dataset, PairSampler, SplitArrays, axial_band,  # noqa: F401
                    clear_cache)
from .proxy_stats import describe_proxy, dice_before, dice_ceiling, plot_montage  # noqa: F401
from .sources import resolve  # noqa: F401
from .augment import (random_crop, random_flip, random_brightness, random_contrast, random_gamma,  # noqa: F401
                      intensity_jitter, bezier_intensity, bezier_lut, apply_lut, bezier_curve,
                      random_bezier_ctrl)
