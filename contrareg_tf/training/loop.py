"""The shared training loop and what every trainer needs around it: distribution strategy, precision, step-keyed
random numbers.

``run_loop`` runs a ``tf.function`` step with a tqdm bar (loss terms, it/s), TensorBoard scalars, checkpoints
(weights + optimizer moments + step + RNG state) every ``ckpt_every`` steps, exact resume, and a hard stop on a
NaN/Inf loss that keeps the last good checkpoint (``TrainingDiverged``).

Exact resume: every random choice of a step (which subjects form the pair, λ ~ U[0,1], augmentation, sampled
locations) is a pure function of ``(seed, step, stream)`` (:func:`step_rng`, defined in ``rng.py``), and in-graph
random draws come from a checkpointed ``tf.random.Generator``, so a resumed run draws exactly what the
uninterrupted run would have drawn. (``tf.random.set_seed`` per step would also do it, but it clears TF's kernel
caches: 10× slower.)
"""
import math
import os

import numpy as np
import tensorflow as tf

from ..errors import ContraRegInputError, TrainingDiverged
from ..rng import step_rng  # noqa: F401  (lives in rng.py so data/ can use it; this import path keeps working)


# --------------------------------------------------------------------------------------------------------------
# distribution, precision
# --------------------------------------------------------------------------------------------------------------
def get_strategy(name="default"):
    """``default`` | ``mirrored`` (all local GPUs, or CPUs when none) | ``multiworker`` (TF_CONFIG)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ContraRegInputError(f"unknown strategy {name!r}; choose default, mirrored or multiworker")


def set_mixed_precision(enabled):
    """Keras mixed_float16 policy (GPU only; off on CPU where it only slows things down)."""
    policy = "mixed_float16" if enabled else "float32"
    tf.keras.mixed_precision.set_global_policy(policy)


# --------------------------------------------------------------------------------------------------------------
# the shared loop
# --------------------------------------------------------------------------------------------------------------
def _distribute(strategy, batch):
    """Split a numpy batch across replicas (identity for the default strategy)."""
    n = strategy.num_replicas_in_sync
    if n == 1:
        return {k: tf.convert_to_tensor(v) for k, v in batch.items()}

    def value_fn(ctx):
        i = ctx.replica_id_in_sync_group
        return {k: tf.convert_to_tensor(np.array_split(v, n)[i]) for k, v in batch.items()}

    return strategy.experimental_distribute_values_from_function(value_fn)


def run_loop(step_fn, batch_fn, ckpt, out_dir, iters, ckpt_every, strategy=None, resume=False, progress=True,
             desc="train", log_every=1, max_seconds=None):
    """Run ``step_fn(batch) -> dict of scalar tensors`` (must contain ``'loss'``) from the checkpoint's step
    to ``iters``. Returns the history (list of dicts); raises ``TrainingDiverged`` on a NaN/Inf loss.
    ``out_dir=None``: no checkpoints, no TensorBoard (nothing written). ``max_seconds``: stop after the step
    that crosses this wall time (checkpointed)."""
    import time

    from tqdm.auto import tqdm

    strategy = strategy or tf.distribute.get_strategy()
    manager = writer = None
    if out_dir is not None:
        manager = tf.train.CheckpointManager(ckpt, os.path.join(out_dir, "ckpt"), max_to_keep=3)
        writer = tf.summary.create_file_writer(os.path.join(out_dir, "tb"))
    if resume and manager is not None and manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    elif resume:
        where = os.path.join(out_dir, "ckpt") if out_dir is not None else "(no output folder)"
        raise ContraRegInputError(f"--resume: no checkpoint found in {where}")
    start = int(ckpt.step.numpy())
    t0 = time.time()
    history = []
    bar = tqdm(range(start, iters), initial=start, total=iters, desc=desc, disable=not progress,
               dynamic_ncols=True)
    for step in bar:
        try:
            terms = step_fn(_distribute(strategy, batch_fn(step)))
            terms = {k: float(v) for k, v in terms.items()}
        except tf.errors.InvalidArgumentError as e:
            # a NaN velocity turns into out-of-range gather indices inside vxm's interpolation
            if "indices" not in str(e) and "NaN" not in str(e) and "Inf" not in str(e):
                raise
            terms = {"loss": float("nan")}
        if not all(math.isfinite(v) for v in terms.values()):
            last = (manager.latest_checkpoint if manager is not None else None) or \
                "none (no checkpoint was written yet)"
            bar.close()
            raise TrainingDiverged(f"non-finite loss at step {step} ({terms}); stopped. Last good checkpoint "
                                   f"kept: {last}")
        ckpt.step.assign(step + 1)
        history.append({"step": step + 1, **terms})
        timeout = max_seconds is not None and time.time() - t0 > max_seconds
        if (step + 1) % log_every == 0:
            bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()})
            if writer is not None:
                with writer.as_default():
                    for k, v in terms.items():
                        tf.summary.scalar(k, v, step=step + 1)
        if manager is not None and ((step + 1) % ckpt_every == 0 or step + 1 == iters or timeout):
            manager.save(checkpoint_number=step + 1)
        if timeout:
            break
    bar.close()
    if writer is not None:
        writer.flush()
    return history


def _per_replica_mean(strategy, per_sample, global_batch):
    if strategy.num_replicas_in_sync == 1:
        return tf.reduce_mean(per_sample)
    return tf.nn.compute_average_loss(per_sample, global_batch_size=global_batch)


def _reduce_terms(strategy, terms):
    if strategy.num_replicas_in_sync == 1:
        return terms
    return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in terms.items()}
