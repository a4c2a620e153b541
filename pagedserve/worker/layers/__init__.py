"""Model building blocks: norms, rotary embeddings, paged attention."""
