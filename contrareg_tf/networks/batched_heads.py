"""Projection heads run together: a speed device for PatchNCE (``losses/patchnce.py``), not part of its equation.

Why it exists: a CR / mCR step projects the sampled features of L = 6 layers, both sides (query, key) and both
directions (d12, d21) through the 2·L heads F1^k, F2^k (``networks/heads.py``, each a 3-layer MLP): called one by
one that is 4·L small matmul chains per step, and at the cpu-demo size the step time follows the op count of the
traced graph (bench/results/steps_2026-12-07b.md). :func:`apply_heads` makes one call per distinct head (the rows of
all its calls concatenated) and then runs every deeper Dense layer of all heads of equal shape as one batched matmul
over a stacked heads axis. Together with the last-layer point evaluation (``networks/point_features.py``) this took
the cpu-demo CR step from 0.161 to 0.139 s and mCR from 0.183 to 0.122 s (idle machine,
bench/results/steps_2026-12-07.md).

Exactness: each row gets the same arithmetic as a separate call of its own head (the same kernel and bias, the same
activation, the same normalisation layer); only which rows share a matmul launch changes. Heads that are not the
paper's ``ProjectionHead`` (any callable, e.g. a ``Sequential``) are simply called once on their concatenated rows.
"""
import tensorflow as tf

from .. import ops


def _stackable(head):
    """A ProjectionHead-like MLP whose Dense layers can run as one batched matmul with other heads'."""
    layers = getattr(head, "dense_layers", None)
    return (layers and all(isinstance(d, tf.keras.layers.Dense) and d.built for d in layers)
            and all(d.activation in (tf.keras.activations.relu, tf.keras.activations.linear) for d in layers))


def apply_heads(calls):
    """Project gathered features: ``calls`` = list of (head, g (B, n, C)) → list of (B, n, D).

    One call per distinct head (the rows of all its calls concatenated). Heads with ``dense_layers`` (the
    paper's ProjectionHead: Dense–ReLU–…–Dense then x/(‖x‖+eps)) and equal row counts and widths run their
    first Dense each, then every further depth as one batched matmul over all heads (same arithmetic per
    row as separate calls)."""
    order, rows = [], {}
    for head, g in calls:
        if id(head) not in rows:
            order.append(head)
            rows[id(head)] = []
        rows[id(head)].append(g)
    flat = {}
    for head in order:
        gs = rows[id(head)]
        x = [tf.reshape(g, [-1, g.shape[-1]]) for g in gs]
        flat[id(head)] = tf.concat(x, 0) if len(x) > 1 else x[0]
    out = {}
    groups = {}
    for head in order:
        if _stackable(head):
            d = head.dense_layers
            key = (len(d), tuple(int(x.units) for x in d), flat[id(head)].shape[0],
                   getattr(head.normalize, "eps", None) if hasattr(head, "normalize") else None,
                   tuple(x.activation.__name__ for x in d), tuple(x.use_bias for x in d))
            if key[2] is not None:
                groups.setdefault(key, []).append(head)
                continue
        out[id(head)] = head(flat[id(head)])
    for key, heads in groups.items():
        if len(heads) == 1:
            out[id(heads[0])] = heads[0](flat[id(heads[0])])
            continue
        y = tf.stack([h.dense_layers[0](flat[id(h)]) for h in heads])                       # (H, R, U)
        for i in range(1, key[0]):
            dl = [h.dense_layers[i] for h in heads]
            y = tf.matmul(y, tf.stack([tf.cast(d.kernel, y.dtype) for d in dl]))
            if dl[0].use_bias:
                y = y + tf.stack([tf.cast(d.bias, y.dtype) for d in dl])[:, None, :]
            y = dl[0].activation(y)   # relu or linear, the same for every head of the group (key)
        if key[3] is not None:
            y = heads[0].normalize(y)
        for h, yh in zip(heads, tf.unstack(y)):
            out[id(h)] = yh
    res, pos = [], {}
    for head, g in calls:
        p = out[id(head)]
        sizes = [tf.shape(x)[0] * tf.shape(x)[1] for x in rows[id(head)]]
        if len(sizes) > 1:
            if id(head) not in pos:
                pos[id(head)] = iter(tf.split(p, tf.stack(sizes), axis=0))
            p = next(pos[id(head)])
        res.append(tf.reshape(p, tf.concat([tf.shape(g)[:2], tf.shape(p)[-1:]], 0)))
    return res


def _self_normalising(head):
    return isinstance(getattr(head, "normalize", None), tf.keras.layers.Layer)


def project(calls, normalize=True):
    """:func:`apply_heads`, then x/‖x‖ where ``normalize`` (a flag, or one per call) asks for it, except after heads
    that end in their own normalisation layer (``ProjectionHead``'s x/(‖x‖+eps) is not applied a second time)."""
    flags = [normalize] * len(calls) if isinstance(normalize, bool) else list(normalize)
    return [ops.l2_normalize(p) if flag and not _self_normalising(head) else p
            for (head, _), p, flag in zip(calls, apply_heads(calls), flags)]
