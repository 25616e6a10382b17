#!/usr/bin/env bash
# The GPU check, for a machine with CUDA: the gpu-marked tests (a CUDA fit of the quick-start in 32-true,
# 16-mixed and bf16-mixed; a 2-GPU NCCL world-size check when two GPUs exist; idle clients hold no GPU memory;
# host-stored CLIP images on CUDA), then the throughput benchmark. About 8 minutes at most; everything it prints
# also goes to benchmarks/results/gpu_check.txt, the throughput table to benchmarks/results/gpu_throughput.md.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline HF_HUB_OFFLINE=1
out=benchmarks/results
mkdir -p "$out"
log="$out/gpu_check.txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
} > "$log" 2>&1
timeout 300 python -m pytest -q -p no:cacheprovider -m gpu tests/gpu tests/data/test_clip_inputs.py 2>&1 | tee -a "$log"
tests=${PIPESTATUS[0]}
timeout 240 python benchmarks/throughput.py --device cuda --out "$out/gpu_throughput.md" 2>&1 | tee -a "$log"
bench=${PIPESTATUS[0]}
echo "gpu tests: exit $tests; throughput: exit $bench" | tee -a "$log"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
