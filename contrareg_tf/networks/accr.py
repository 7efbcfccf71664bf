"""ACCR's cross-modal attention block (the review's §4 b, "cross-attention layers align feature maps across
modalities"; our reading, the equations below are ours).

:class:`CrossAttention` (one direction): queries from one feature set X (n, C), keys and values from the other
feature set Y (m, C), learned linear projections (1×1(×1) convolutions = ``Dense`` on the channel axis, no
biases), scaled dot-product attention and a residual connection::

    Q = X W_q,  K = Y W_k,  V = Y W_v          (W_q, W_k, W_v: C × d,  d = attention channels)
    A = softmax_rows( Q Kᵀ / √d )                (n × m)
    out = X + (A V) W_o                         (W_o: d × C)

:class:`CrossModalAttention` (the block): two such directions with their own weights, one per modality, applied
to the two feature sets at once (each refined from the *unrefined* other one)::

    (F1, F2) ↦ (F1 + Attn_{1←2}(F1, F2),  F2 + Attn_{2←1}(F2, F1))

F1 = modality-1 (T1w) features, F2 = modality-2 (T2w) features. Choices (ours): one head; no biases (a key
bias adds the same constant to every logit of a query row and cancels in the softmax); Glorot-uniform
initialisation of all four projections (the block is not an identity at initialisation); no positional
encoding (the sets are unordered). The inputs are sets of feature vectors (B, n, C) — which locations form
the set is the caller's choice (``losses/accr.py``: the sampled locations of the contrastive loss; full
resolution N×N attention would not fit).

This module imports nothing from ``data/`` or ``training/``.
"""
import tensorflow as tf


class CrossAttention(tf.keras.layers.Layer):
    """``(x (B, n, C), y (B, m, C)) -> x + softmax(x W_q (y W_k)ᵀ / √d) (y W_v) W_o`` (B, n, C)."""

    def __init__(self, channels: int, attn_channels: int, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.attn_channels = int(channels), int(attn_channels)
        dense = (lambda units, nm: tf.keras.layers.Dense(units, use_bias=False, name=f"{self.name}_{nm}"))
        self.wq = dense(self.attn_channels, "q")
        self.wk = dense(self.attn_channels, "k")
        self.wv = dense(self.attn_channels, "v")
        self.wo = dense(self.channels, "o")

    def build(self, input_shape=None):
        for d in (self.wq, self.wk, self.wv):
            d.build((None, self.channels))
        self.wo.build((None, self.attn_channels))
        super().build(input_shape)

    def call(self, x, y):
        q, k, v = self.wq(x), self.wk(y), self.wv(y)
        logits = tf.einsum("bnd,bmd->bnm", q, k) / tf.sqrt(tf.cast(self.attn_channels, q.dtype))
        return x + self.wo(tf.einsum("bnm,bmd->bnd", tf.nn.softmax(logits, axis=-1), v))

    def get_config(self):
        cfg = super().get_config()
        cfg.update(channels=self.channels, attn_channels=self.attn_channels)
        return cfg


class CrossModalAttention(tf.keras.layers.Layer):
    """``(f1 (B, n, C), f2 (B, m, C)) -> (f1 + Attn_{1←2}(f1, f2), f2 + Attn_{2←1}(f2, f1))``; weights built at
    construction (so an optimiser can be built before the first call)."""

    def __init__(self, channels: int, attn_channels: int, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.attn_channels = int(channels), int(attn_channels)
        self.to1 = CrossAttention(channels, attn_channels, name=f"{self.name}_1from2")
        self.to2 = CrossAttention(channels, attn_channels, name=f"{self.name}_2from1")
        self.build(None)

    def build(self, input_shape=None):
        self.to1.build()
        self.to2.build()
        super().build(input_shape)

    def call(self, f1, f2):
        return self.to1(f1, f2), self.to2(f2, f1)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(channels=self.channels, attn_channels=self.attn_channels)
        return cfg
