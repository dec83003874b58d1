"""Fusion that chooses its settings by what the fused network measures on held-out data.

``split`` draws the calibration data's build and held-out parts, ``scoring`` measures a fused
network against the parents' weighted ensemble (label-free) or labels, ``refit`` is the
closed-form head correction towards that ensemble, ``mappings`` the k best layer mappings from a
map's stored costs, ``space`` the candidate settings and budget,
``run`` the search itself, and ``builders`` turn candidates into fused modules on the one engine
(each checkpoint read once; recordings, transport plans and moved tensors reused between
candidates). ``clafuse.api.searching`` wires it into ``fuse --search``.
"""
