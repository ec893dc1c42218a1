"""Graph IR: ops, graph, passes, float64 evaluation."""
