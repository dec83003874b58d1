"""Cross-layer alignment: layer-to-layer costs and the order-preserving assignment (DP)."""
