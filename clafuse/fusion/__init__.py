"""Fusion: balancing depths, optimal-transport alignment of neurons, and averaging."""
