"""Graph passes over the traced encoder (installed as skrr_compile.passes)."""
