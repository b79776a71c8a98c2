"""Layers shared by every model family: attention, feed-forward, norms, position embeddings."""
