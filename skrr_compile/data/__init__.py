"""Prompt sets shipped with the package: calibration (prompts.txt) and held-out (heldout.txt)."""
