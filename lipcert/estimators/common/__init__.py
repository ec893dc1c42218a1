"""Numerics shared by several methods: directed rounding, per-layer norms, input regions."""
