"""Tensor parallelism: the TP group and its collectives, and rank 0's per-step broadcast of request
changes to the other ranks."""
