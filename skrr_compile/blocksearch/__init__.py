"""The block search: calibration, discrepancy, staged runner, the Skrr search, its baselines, reports.

Named `blocksearch`, not `search`, so that the top-level verb `skrr_compile.search` (the function) never
shadows a subpackage (`import skrr_compile.search as s` would bind the function).
"""
