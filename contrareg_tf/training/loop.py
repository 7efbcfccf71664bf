"""The shared training loop and what every trainer needs around it: distribution strategy, precision, step-keyed
random numbers.

``run_loop`` runs a ``tf.function`` step with a tqdm bar (loss terms, it/s), TensorBoard scalars, checkpoints
(weights + optimizer moments + step + RNG state) every ``ckpt_every`` steps, exact resume, and a hard stop on a
NaN/Inf loss that keeps the last good checkpoint (``TrainingDiverged``).

Multi-worker training (``MultiWorkerMirroredStrategy``, cluster and task from ``TF_CONFIG``) follows TF's
multi-worker custom-loop guide: every worker runs every step, reduction and checkpoint save (in lock-step, so no
collective is left waiting), but only the chief (task ``chief``, or ``worker`` 0 when the cluster has no chief:
``strategy.extended.should_checkpoint``) writes into the output folder — checkpoints, TensorBoard and, in the
trainers, ``config.json``/``model.h5``/``card.json``. The other workers save their checkpoints into a temporary
folder of their own, deleted at the end, and on ``--resume`` every worker restores the chief's latest checkpoint
(``OUT/ckpt``: a folder all workers can read). Every worker draws the same global batch (a pure function of
``(seed, step)``) and keeps its replicas' slice of it (``_distribute``), so N steps on W workers with global
batch B give the weights of N single-process steps with batch B (up to float summation order), for losses
without in-graph random draws; PatchNCE's sampled locations come from the checkpointed generator, which TF
splits into one stream per replica, so there the runs agree in distribution only.

Exact resume: every random choice of a step (which subjects form the pair, λ ~ U[0,1], augmentation, sampled
locations) is a pure function of ``(seed, step, stream)`` (:func:`step_rng`, defined in ``rng.py``), and in-graph
random draws come from a checkpointed ``tf.random.Generator``, so a resumed run draws exactly what the
uninterrupted run would have drawn. (``tf.random.set_seed`` per step would also do it, but it clears TF's kernel
caches: 10× slower.)
"""
import contextlib
import csv
import glob
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from .. import lock
from ..atomic import atomic_path
from ..errors import ContraRegInputError, TrainingDiverged
from ..progress import phase, say
from ..rng import step_rng  # noqa: F401  (lives in rng.py so data/ can use it; this import path keeps working)
from .plateau import plateau_reached


# --------------------------------------------------------------------------------------------------------------
# distribution, precision
# --------------------------------------------------------------------------------------------------------------
_MULTIWORKER = []  # the process's one MultiWorkerMirroredStrategy (collectives are configured once per process)


def get_strategy(name="default"):
    """``default`` | ``mirrored`` (all local GPUs, or CPUs when none) | ``multiworker`` (cluster and task from
    ``TF_CONFIG``; one per process, created before TF runs anything else — TF configures the collectives at
    program start-up — and returned again on later calls). A non-chief worker's ``train.lock`` is named after
    its task (``lock.set_worker``), so all workers of one run can share ``--out``."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if not _MULTIWORKER:
            _check_tf_config()
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
            if not is_chief(strategy):
                lock.set_worker(worker_name(strategy))
            _MULTIWORKER.append(strategy)
        return _MULTIWORKER[0]
    raise ContraRegInputError(f"unknown strategy {name!r}; choose default, mirrored or multiworker")


def _check_tf_config():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return  # MultiWorkerMirroredStrategy then trains on this machine alone
    try:
        conf = json.loads(raw)
        task = conf["task"]
        cluster = conf["cluster"]
        ok = isinstance(cluster, dict) and task["type"] in cluster and 0 <= int(task["index"]) < len(
            cluster[task["type"]])
    except (ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise ContraRegInputError('TF_CONFIG: expected JSON {"cluster": {"worker": ["host:port", ...]}, '
                                  f'"task": {{"type": "worker", "index": i}}}} naming a task of the cluster, got '
                                  f'{raw!r}')


def is_chief(strategy):
    """Whether this process writes the run's files: always, except on the non-chief workers of a multi-worker
    strategy (TF's own rule: task ``chief``, or ``worker`` 0 when the cluster has none)."""
    try:
        return bool(strategy.extended.should_checkpoint)
    except NotImplementedError:
        return True


def worker_name(strategy):
    """``worker1`` etc. for a task of a multi-worker cluster; None outside one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return None
    return f"{resolver.task_type}{resolver.task_id}"


def _on_any_worker(strategy, flag):
    """``flag`` OR-ed over the workers of a multi-worker strategy (so that they all stop at the same step)."""
    if worker_name(strategy) is None:
        return flag
    ones = strategy.experimental_distribute_values_from_function(lambda ctx: tf.constant(float(flag)))
    return float(strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)) > 0


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
             desc="train", log_every=1, max_seconds=None, on_checkpoint=None):
    """Run ``step_fn(batch) -> dict of scalar tensors`` (must contain ``'loss'``) from the checkpoint's step
    to ``iters``. Returns the history (list of dicts); raises ``TrainingDiverged`` on a NaN/Inf loss.
    ``out_dir=None``: no checkpoints, no TensorBoard (nothing written). ``max_seconds``: stop after the step
    that crosses this wall time (checkpointed). A non-chief worker of a multi-worker strategy writes nothing
    into ``out_dir``: its checkpoints go to a temporary folder (removed on return); it resumes from the chief's.
    ``on_checkpoint(step)``: called on the chief after each checkpoint is written (e.g. the validation curve); a
    true return value ends training there (a plateau rule), on every worker alike."""
    strategy = strategy or tf.distribute.get_strategy()
    chief = is_chief(strategy)
    manager = writer = ckpt_dir = None
    own_dir = None  # a non-chief worker's temporary checkpoint folder
    if out_dir is not None:
        ckpt_dir = os.path.join(out_dir, "ckpt")
        if chief:
            manager = tf.train.CheckpointManager(ckpt, ckpt_dir, max_to_keep=3)
            writer = tf.summary.create_file_writer(os.path.join(out_dir, "tb"))
        else:
            own_dir = tempfile.mkdtemp(prefix=f"contrareg_ckpt_{worker_name(strategy)}_")
            manager = tf.train.CheckpointManager(ckpt, own_dir, max_to_keep=1)
    try:
        return _run(step_fn, batch_fn, ckpt, manager, writer, ckpt_dir, iters, ckpt_every, strategy, resume,
                    progress, desc, log_every, max_seconds, chief, on_checkpoint)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def _run(step_fn, batch_fn, ckpt, manager, writer, ckpt_dir, iters, ckpt_every, strategy, resume, progress, desc,
         log_every, max_seconds, chief, on_checkpoint=None):
    def chief_latest():
        if manager is None:
            return None
        return manager.latest_checkpoint if chief else tf.train.latest_checkpoint(ckpt_dir)

    latest = chief_latest() if resume else None
    if latest:
        state = tf.train.get_checkpoint_state(ckpt_dir)
        _restore_newest_readable(ckpt, list(state.all_model_checkpoint_paths) if state else [latest])
    elif resume:
        raise ContraRegInputError(f"--resume: no checkpoint found in {ckpt_dir or '(no output folder)'}")
    start = int(ckpt.step.numpy())
    t0 = time.time()
    history = []
    # the first step traces and compiles the graph (seconds to minutes): its own line, then the bar (or, without
    # a bar, one line per checkpoint) so that no phase of a training is silent
    bar = tqdm(disable=True)            # replaced by the real bar once the first step is done
    for step in range(start, iters):
        first = step == start
        try:
            with phase(f"{desc}: first step {step + 1} of {iters} (builds the training graph)") if first \
                    else contextlib.nullcontext():
                terms = {k: float(v) for k, v in step_fn(_distribute(strategy, batch_fn(step))).items()}
            if first:
                bar = tqdm(total=iters, initial=step + 1, desc=desc, dynamic_ncols=True, disable=not progress)
                t_last, step_last = time.time(), step + 1
            else:
                bar.update(1)
        except tf.errors.InvalidArgumentError as e:
            # a NaN velocity turns into out-of-range gather indices inside vxm's interpolation
            if "indices" not in str(e) and "NaN" not in str(e) and "Inf" not in str(e):
                raise
            terms = {"loss": float("nan")}
        if not all(math.isfinite(v) for v in terms.values()):
            last = chief_latest() or "none (no checkpoint was written yet)"
            bar.close()
            raise TrainingDiverged(f"non-finite loss at step {step} ({terms}); stopped. Last good checkpoint "
                                   f"kept: {last}")
        ckpt.step.assign(step + 1)
        history.append({"step": step + 1, **terms})
        timeout = max_seconds is not None and _on_any_worker(strategy, time.time() - t0 > max_seconds)
        if (step + 1) % log_every == 0:
            bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()})
            if writer is not None:
                with writer.as_default():
                    for k, v in terms.items():
                        tf.summary.scalar(k, v, step=step + 1)
        stop = False
        if manager is not None and ((step + 1) % ckpt_every == 0 or step + 1 == iters or timeout):
            _save(manager, step + 1, chief_latest)
            if not progress and step + 1 > step_last:
                rate = (time.time() - t_last) / (step + 1 - step_last)
                say(f"{desc}: step {step + 1} of {iters}, " + ", ".join(f"{k} {v:.4g}" for k, v in terms.items())
                    + f", {rate:.3g} s/step")
                t_last, step_last = time.time(), step + 1
            if on_checkpoint is not None:   # the chief decides; the other workers stop with it
                stop = _on_any_worker(strategy, bool(on_checkpoint(step + 1)) if chief else False)
        if timeout or stop:
            break
    bar.close()
    if writer is not None:
        writer.flush()
    return history


def _save(manager, number, latest):
    """``manager.save``; when it fails (a full disk, a read-only folder) TF's half-written ``ckpt-N_temp`` folder is
    removed and one ``ContraRegInputError`` names the checkpoint and the last complete one, which stays usable."""
    try:
        manager.save(checkpoint_number=number)
    except (OSError, tf.errors.OpError) as e:
        for tmp in glob.glob(os.path.join(manager.directory, f"ckpt-{number}_temp*")):
            shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.remove(tmp)
        why = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:200]
        raise ContraRegInputError(f"{manager.directory}: cannot write checkpoint {number} ({why}); the last "
                                  f"complete checkpoint is kept: {latest() or 'none'} (--resume continues "
                                  "from it)") from None


def _restore_newest_readable(ckpt, paths):
    """Restore the newest of ``paths`` (oldest first, as TF lists them) that reads completely; each unreadable
    one (truncated or deleted by a crash or a full disk) is named in a ``warning:`` line and skipped."""
    for path in reversed(paths):
        try:
            ckpt.restore(path).assert_existing_objects_matched()
            return path
        # a truncated .data file raises IndexError ("Read less bytes than requested") from TF's reader
        except (tf.errors.OpError, ValueError, AssertionError, IndexError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"warning: --resume: skipping unreadable checkpoint {path} ({type(e).__name__}: {first[:200]})",
                  file=sys.stderr)
    raise ContraRegInputError(f"--resume: none of the checkpoints {[os.path.basename(p) for p in paths]} in "
                              f"{os.path.dirname(paths[-1])} can be read")


def _per_replica_mean(strategy, per_sample, global_batch):
    if strategy.num_replicas_in_sync == 1:
        return tf.reduce_mean(per_sample)
    return tf.nn.compute_average_loss(per_sample, global_batch_size=global_batch)


def _reduce_terms(strategy, terms):
    if strategy.num_replicas_in_sync == 1:
        return terms
    return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in terms.items()}


def val_curve_callback(out_dir, model, validate, name="val_curve.csv", rule=None):
    """``on_checkpoint`` for :func:`run_loop` that appends (step, ``validate(model)``) to ``out_dir/name`` (Fig. 3
    col. 4: validation Dice vs training step). Rows at or past a step being re-written (a resumed run that
    re-does steps) are replaced, so the file always describes the weights that led to the final model.
    ``rule`` (a ``config.PlateauRule``): the callback returns True once the curve has reached its plateau
    (``training.plateau.plateau_reached``), which ends the run."""

    path = os.path.join(out_dir, name)

    def on_checkpoint(step):
        rows = []
        if os.path.isfile(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < step]
        rows.append({"step": step, "dice": f"{float(validate(model)):.6g}"})
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "dice"])
            w.writeheader()
            w.writerows(rows)
        return rule is not None and plateau_reached([int(r["step"]) for r in rows],
                                                    [float(r["dice"]) for r in rows], rule)

    return on_checkpoint


def any_callback(*callbacks):
    """One ``on_checkpoint`` that runs every given callback (None entries skipped) and stops when any says so."""
    cbs = [c for c in callbacks if c is not None]
    if not cbs:
        return None

    def on_checkpoint(step):
        return any([bool(c(step)) for c in cbs])   # a list: every callback runs (each logs its curve)

    return on_checkpoint


def peak_rss_mb():
    """Peak resident memory of this process so far (MB; Linux ``ru_maxrss``), recorded in run cards. A worker
    process that trained several methods reports the peak over all of them."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
