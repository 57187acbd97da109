#!/usr/bin/env bash
# One script for a lent GPU (H100/H200), under 13 minutes: kernel tests on CUDA (compiled Triton, not the
# interpreter) against the torch references, bench_discrepancy (HBM fraction, fused projection vs eager),
# a T5-XXL-shaped search (random init, bf16, 256 prompts x 256 tokens, 2-3 skips) with its measured peak
# against the dry-run estimate, candidate batching on MiniLM and SmolLM2 (wall, evaluations, peak memory, plan
# equality; issue 25), and the onnxruntime CUDA provider check. Output: bench/results/gpu_check_<device>.txt
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
  echo "== 4. candidate batching (issue 25): the fast search one candidate at a time vs stacked, same plan?"
  if [ "$DEV" = cpu ]; then  # the dry run: the same script path, a tiny calibration
    timeout 120 $PY bench/bench_candidate_batch.py --model minilm --n 4 --max-length 16 --sparsity 0.3 --batches 1,auto --threads 1 2>&1 | tail -12
  else
    timeout 100 $PY bench/bench_candidate_batch.py --model minilm --device cuda --n 32 --sparsity 0.3,0.4 --batches 1,2,4,8,auto 2>&1 | tail -24
    timeout 100 $PY bench/bench_candidate_batch.py --model smollm2 --device cuda --n 16 --max-length 32 --chunk-size 2 --sparsity 0.3 --batches 1,4,auto 2>&1 | tail -10
  fi
  echo "== 5. onnxruntime CUDA provider"
  timeout 60 $PY - <<'PY' 2>&1 | tail -5
import onnxruntime as ort
providers = ort.get_available_providers()
print("available providers:", providers)
from skrr_compile.deploy.onnx import onnx_session  # noqa: E402
print("CUDAExecutionProvider usable:" , "CUDAExecutionProvider" in providers)
PY
} 2>&1 | tee "$OUT"
echo "wrote $OUT"
