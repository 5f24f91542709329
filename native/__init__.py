"""numoe native kernels (C, bound with cffi in API mode). The Python face is native.kernels."""
