"""Choosing the next token: the sampler, per-request logit adjustments and grammar-constrained output."""
