"""One step on the device: a batch becomes tensors, the model runs (eagerly or as a decode CUDA graph)
and its last positions are sampled."""
