"""Magnitude pruning (Ramesh & Zhao) of text encoders and denoisers: per matrix, global, Wanda, and N:M (2:4) semi-structured.

Which layers count: the weight matrices of ``nn.Linear`` layers, as the Stable Diffusion pruning study prunes
them (its "UNet sparsity" excludes convolutions). ``include_conv=True`` adds the weights of
``nn.Conv1d/2d/3d`` (not transposed convolutions). Embeddings, norms and biases are never pruned. Every report
gives the sparsity three ways: over Linear weights (the study's definition), over Linear + conv weights, and over
all parameters of the component.

Criteria (``MagnitudeConfig.criterion``):

- ``magnitude``: each matrix pruned to the target on its own: the ``round(s * n)`` entries of smallest ``|w|``
  (ties broken by position, so the count is exact);
- ``global``: one threshold over all selected weights of the component, the k-th smallest ``|w|`` with
  ``k = round(s * N)``; entries below it are pruned, and entries equal to it in order until exactly k are;
- ``wanda``: score ``|W_ij| * ||X_j||_2`` (Sun et al. 2023), ``X_j`` the j-th input feature over the
  calibration tokens (padding excluded for text encoders); compared within each output row (``wanda_group="row"``,
  as the paper) or over the whole matrix.

``pattern="2:4"`` (or any ``N:M``) keeps the N largest scores in every M consecutive weights along the input
dimension instead (sparsity fixed at 1 - N/M); the input dimension must be a multiple of M.

``prune`` zeroes weights in place and returns a ``PruneResult``; ``hybrid`` applies a Skrr plan first and prunes
only the weights that remain, on copies (the dense model is left untouched).


Modules: config (MagnitudeConfig, presets), layers (what is pruned, measured sparsity), masks, wanda
(calibration hooks), prune (prune, hybrid), layouts (CSR, 2:4), denoiser, sweep, storage.
"""
