"""Continuous batching: admission, chunked prefill, mixed and decode batches, retraction, finishing."""
