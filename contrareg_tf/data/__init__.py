"""Data: NIfTI io and preprocessing, data-set descriptions, the built-in data sets (real ICBM 2009c T1w/T2w +
CerebrA by default, ``python -m contrareg_tf.data build`` writes one to a folder),
the one per-subject loader (``dataset.load_subject``), inter-subject pairs (``pairs.make_pairs`` for
evaluation, ``pairs.PairSampler`` for training) and augmentation."""
from .io import (Volume, CropInfo, load_nifti, save_nifti, check_same_shape, check_nonempty_mask,  # noqa: F401
                 normalize_intensity, crop_or_pad, uncrop, foreground_mask)
from .dataset import (Subject, Description, load_description, write_description, split_counts,  # noqa: F401
                      assign_splits, SPLITS, resolve, load_images, load_subject)
from .proxy import (build_proxy, default_cache_dir, describe_proxy, dice_before, dice_ceiling,  # noqa: F401
                    true_pair_warp, integrate_svf, random_svf, proxy_dir, nilearn_data_dir, LABEL_NAMES,
                    SOURCES, template, label_info, plot_montage, augment_contrast)
from .pairs import (make_pairs, load_split_arrays, pair_dataset, PairSampler, SplitArrays, axial_band,  # noqa: F401
                    clear_cache)
from .augment import (random_crop, random_flip, random_brightness, random_contrast, random_gamma,  # noqa: F401
                      intensity_jitter, jitter_intensity, bezier_intensity, bezier_lut, apply_lut, bezier_curve,
                      random_bezier_ctrl)
