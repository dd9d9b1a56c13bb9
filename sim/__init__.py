"""Tandem's SimPy capacity planner: predict latency, throughput, cost and power of a cluster layout.

Imports only the shared layout schema, metric definitions and errors from `services`; never torch.
"""
