#!/usr/bin/env bash
# One script for a lent GPU (H100/H200), under 8 minutes: kernel tests on CUDA (compiled Triton, not the
# interpreter) against the torch references, bench_discrepancy (HBM fraction, fused projection vs eager),
# a T5-XXL-shaped search (random init, bf16, 256 prompts x 256 tokens, 2-3 skips) with its measured peak
# against the dry-run estimate, and the onnxruntime CUDA provider check. Output: bench/results/gpu_check_<device>.txt
# Usage: bash bench/gpu_check.sh   (set up first with `make install`; on CPU it stops where CUDA is needed)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEV=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else 'cpu')")
OUT=bench/results/gpu_check_${DEV}.txt
unset TRITON_INTERPRET
{
  echo "# bench/gpu_check.sh on ${DEV}, $(date -u +%Y-%m-%dT%H:%MZ)"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  echo "== 1. kernel tests on CUDA (compiled Triton vs torch references)"
  timeout 150 $PY -m pytest -q -p no:xdist tests/test_kernels.py -m gpu 2>&1 | tail -5
  echo "== 2. bench_discrepancy (fraction of HBM peak; fused projection vs eager)"
  timeout 150 $PY bench/bench_discrepancy.py 2>&1 | tail -40
  echo "== 3. T5-XXL-shaped search: bf16, 256 prompts x 256 tokens"
  timeout 200 $PY bench/gpu_xxl_search.py --prompts 256 --length 256 2>&1 | grep -v "it/s\]" | tail -20
  echo "== 4. onnxruntime CUDA provider"
  timeout 60 $PY - <<'PY' 2>&1 | tail -5
import onnxruntime as ort
providers = ort.get_available_providers()
print("available providers:", providers)
from skrr_compile.deploy.onnx import onnx_session  # noqa: E402
print("CUDAExecutionProvider usable:" , "CUDAExecutionProvider" in providers)
PY
} 2>&1 | tee "$OUT"
echo "wrote $OUT"
