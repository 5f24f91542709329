"""numoe workers: layers and compute backends."""
