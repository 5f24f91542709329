"""Compute backends behind one interface: numpy reference, native CPU (cffi)."""
