"""Building blocks of the models: TP-ready linears and embeddings, norms, rotary embedding, attention."""
