"""Up-front memory estimate of an instance-optimisation job, so that a pair that cannot fit is refused with one
error line (the number and what would help) before anything is loaded or computed.

Model (float32, batch 1; N full-size voxels, n_k voxels of pyramid level k, C descriptor channels, n = 2 or 3):

    bytes ≈ base + 4 · [ N · (C · F_full + A)  +  max_k n_k · (C · F_level + B · n) ]

F_full: full-size descriptor copies alive at once (both images' maps, ψ_σ and the MIND intermediates:
``MEMORY_FULL_COPIES``), A: images, warp and labels at full size (``MEMORY_IMAGE_COPIES``), F_level: the
level's fixed / moving maps, the warped map and its gradient (``MEMORY_LEVEL_COPIES``), B: the displacement,
its Adam moments and gradients per spatial axis (``MEMORY_DISP_COPIES``), plus the process itself
(``MEMORY_BASE``). Fitted to the peak RSS of MIND-SSC runs of 96³ random images on this project's CPU stack (TF
2.15; 0.57 GiB before the call): ``paper`` 1.90 GiB, ``convex`` 1.04 GiB, then rounded up by ~30 % (the estimate
gives 2.45 and 1.34 GiB). It is meant to refuse jobs that are off by a large factor (a 512³ pair at full
resolution: ~270 GiB with ``paper``), not to predict the peak to a few per cent.
"""
import os
import resource

from ..errors import ContraRegInputError
from .solver import level_shapes

# descriptor channels per feature kind (3-D, 2-D); autoencoders: the paper layout's six feature layers
CHANNELS = {"mindssc": (12, 4), "mind": (6, 4), "dns": (24, 24), "ae": (208, 208)}
MEMORY_FULL_COPIES = 10
MEMORY_IMAGE_COPIES = 10
MEMORY_LEVEL_COPIES = 28
MEMORY_DISP_COPIES = 16
MEMORY_BASE = 0.75 * 2 ** 30          # TF, the Python process and the loaded modules


def estimate_bytes(shape, features, schedule):
    """Estimated peak bytes of ``instance_optimise`` on one pair of spatial ``shape`` (module docstring)."""
    ndim = len(shape)
    c = CHANNELS.get(features if isinstance(features, str) else "", CHANNELS["dns"])[0 if ndim == 3 else 1]
    n_full = 1
    for n in shape:
        n_full *= int(n)
    levels = level_shapes(tuple(shape), int(schedule.levels), schedule.min_scale, schedule.max_scale)
    n_level = max(_prod(s) for s in levels)
    return MEMORY_BASE + 4.0 * (n_full * (c * MEMORY_FULL_COPIES + MEMORY_IMAGE_COPIES)
                                + n_level * (c * MEMORY_LEVEL_COPIES + MEMORY_DISP_COPIES * ndim))


def _prod(shape):
    out = 1
    for n in shape:
        out *= int(n)
    return out


def _cgroup_limit():
    """The memory limit of this process's cgroup (v2 ``memory.max`` or v1 ``limit_in_bytes``) minus its current
    usage, or None."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as f:
                text = f.read().strip()
            if text == "max":
                return None
            with open(usage) as f:
                used = int(f.read().strip())
            lim = int(text)
            return lim - used if lim < 2 ** 60 else None
        except (OSError, ValueError):
            continue
    return None


def _meminfo(key):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _address_space_left():
    """RLIMIT_AS minus this process's current virtual size (a ``ulimit -v`` limit), or None."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        vm = 0
    return soft - vm


def available_bytes():
    """The memory this process can still use: the smallest of the machine's available memory, the cgroup's
    remaining limit and the remaining address space under ``ulimit -v``."""
    vals = [v for v in (_meminfo("MemAvailable"), _cgroup_limit(), _address_space_left()) if v is not None]
    return min(vals) if vals else None


def check_memory(shape, features, schedule, preset_name="", available=None):
    """Raise ``ContraRegInputError`` (one line: the estimate, what is available, what would help) when the IO
    job on a pair of spatial ``shape`` cannot fit; returns the estimate in bytes."""
    need = estimate_bytes(shape, features, schedule)
    have = available_bytes() if available is None else available
    if have is None or need <= have:
        return need
    gib = 2.0 ** 30
    half = tuple(max(8, int(n) // 2) for n in shape)
    raise ContraRegInputError(
        f"instance optimisation of a {'x'.join(map(str, shape))} pair with features {features}"
        f"{', --io-preset ' + preset_name if preset_name else ''} needs about {need / gib:.1f} GiB, only "
        f"{have / gib:.1f} GiB are available; resample the images to a coarser grid (half the size per axis: about "
        f"{estimate_bytes(half, features, schedule) / gib:.1f} GiB) or run on a machine with more memory")
