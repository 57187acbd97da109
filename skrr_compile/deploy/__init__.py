"""Deployment of pruned encoders: ONNX export, the torch.compile backend, diffusers pipelines."""
