"""The masked InfoNCE kernel shared by PatchNCE (``patchnce.py``), CoRe (``core.py``) and ACCR (``accr.py``).

For anchors i with similarity logits s_ij = a_i · k_j / τ, a positive logit p_i and a set K_i of admitted keys
(the positive among them)::

    ℓ_i = −log[ exp(p_i) / Σ_{j ∈ K_i} exp(s_ij) ] = logsumexp_{j ∈ K_i} s_ij − p_i

The losses differ only in who the anchors, keys and admitted negatives are: PatchNCE and ACCR take row i of the
keys as the positive of query i (:func:`paired_nce`; PatchNCE admits the valid samples, ACCR the other anatomical
regions), CoRe's anchors are the 2N vectors of two views with their partners as positives (:func:`nce_terms`
with its own logits). A key left out of K_i gets the logit :data:`MASKED_LOGIT`, whose exponential underflows to
exactly 0 next to any real logit (|s| ≤ 1/τ): −∞ in effect, without the NaN gradients of a true −∞.
"""
import tensorflow as tf

MASKED_LOGIT = -1e9


def nce_terms(logits, pos, keep):
    """ℓ_i per anchor: logits (B, n, m), pos (B, n), keep (broadcastable to (B, n, m), bool: j ∈ K_i) → (B, n)."""
    return tf.reduce_logsumexp(tf.where(keep, logits, tf.cast(MASKED_LOGIT, logits.dtype)), axis=-1) - pos


def paired_nce(feats_q, feats_k, negatives, tau, feats_ext=None, ext_negatives=None):
    """ℓ_i (B, n) with key i the positive of query i: feats_q, feats_k (B, n, D) unit vectors; ``negatives``
    (broadcastable to (B, n, n), bool) the admitted other keys (the diagonal is admitted always). feats_ext
    (B, m, D): further negatives for every query, admitted where ``ext_negatives`` (broadcastable to (B, n, m))
    is True (all of them when None)."""
    logits = tf.einsum("bid,bjd->bij", feats_q, feats_k) / tau                  # (B, n, n); diag = positives
    pos = tf.linalg.diag_part(logits)
    keep = tf.logical_or(tf.eye(tf.shape(logits)[1], dtype=tf.bool)[None], negatives)
    if feats_ext is not None:           # one more block of keys: the same ℓ_i as masking each block apart
        ext = tf.einsum("bid,bjd->bij", feats_q, feats_ext) / tau
        ext_keep = tf.ones(tf.shape(ext), tf.bool) if ext_negatives is None else ext_negatives
        keep = tf.concat([tf.broadcast_to(keep, tf.shape(logits)), tf.broadcast_to(ext_keep, tf.shape(ext))], -1)
        logits = tf.concat([logits, ext], axis=-1)
    return nce_terms(logits, pos, keep)


def valid_mean(per_anchor, valid):
    """Mean of ``per_anchor`` (B, n) over the anchors with ``valid`` (B, n) set: (B,), 0 where none is."""
    w = tf.cast(valid, per_anchor.dtype)
    return tf.reduce_sum(w * per_anchor, axis=-1) / tf.maximum(tf.reduce_sum(w, axis=-1), 1.0)
