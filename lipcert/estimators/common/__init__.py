"""Numerics shared by several methods: per-layer norms, input regions (directed rounding
is one level lower, in lipcert.rounding: the IR uses it too)."""
