"""Where a model comes from and how it is loaded: local directories, embedded models and bundled configs,
GGUF files (converted once to a cached Hugging Face directory), safetensors or dummy weights."""
