"""The graph core: trace an encoder, the Plan, apply it (PrunedEncoder), save / load, load HF checkpoints."""
