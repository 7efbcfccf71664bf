"""The interface of a similarity that trains its own feature network with the registration network (CoRe, ACCR).

Such a similarity has no autoencoders or PatchNCE heads: it brings trainable encoders (and, for ACCR, an
attention block) that the registration step optimises and the training checkpoint saves. One object serves both
directions of L_sim = ½(d12 + d21), because the two directions share its networks and its random draws.

This module is a leaf (it imports nothing from the package): the registry (``similarity.py``) lists the names
that build such an object (``JOINT``), and ``core.py`` / ``accr.py`` satisfy the protocol structurally,
without inheriting from it.
"""
from typing import Protocol, runtime_checkable


@runtime_checkable
class JointSimilarity(Protocol):
    """A jointly trained similarity.

    - ``trainable_variables``: its feature network's weights (optimised with the registration network);
    - ``checkpoint_items()``: dict name -> trackable, added to the training checkpoint (exact resume);
    - ``pair_terms(batch, moved2, moved1, pos_flow, neg_flow) -> (d12, d21)``: per-sample (B,) terms for a
      training batch (``img1``, ``img2``; ``labels1``/``labels2`` int32 (B, *shape, 1) when the spec
      ``needs_labels``); ``pos_flow`` warps subject b's T2w onto a's T1w (moved2), ``neg_flow`` the reverse.
      The flows may be None (then terms that need them are left out)."""

    @property
    def trainable_variables(self) -> list: ...

    def checkpoint_items(self) -> dict: ...

    def pair_terms(self, batch, moved2, moved1, pos_flow=None, neg_flow=None) -> tuple: ...
