#!/usr/bin/env bash
# Every GPU check in one script, for a machine with an NVIDIA GPU and PyTorch already installed.
# Installs nothing, needs no network; its timeouts sum to 580 s (under the 600 s of one device call).
#   bash benchmarks/gpu.sh [OUT_DIR]        (default OUT_DIR: docs/results/)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
status=0
run() { echo "+ $*"; timeout "$1" "${@:2}" || { echo "FAILED ($?): ${*:2}"; status=1; }; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv || true
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cusparselt', \
torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None, \
'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"

# 1. correctness of the real sparse kernels (per layer and whole model, fp16 and bf16)
run 70 $py -m pytest -q -m gpu tests/test_sparse.py -p no:cacheprovider

# 2. where 2:4 starts to pay: single layers, dense cuDNN/cuBLAS vs cuSPARSELt
run 90 $py benchmarks/layers.py --out "$out/layers-gpu.json"

# 3. latency table of torchvision ResNet-50 at 224x224, batch 256, fp16, PyTorch with CUDA graphs: every layer at
#    its candidate counts, dense and cuSPARSELt 2:4; predicted beside measured for the dense and pruned models
run 150 $py -m hybridprune profile --model torchvision:resnet50 --image-size 224 --latency-runtime torch \
    --latency-batch 256 --latency-dtype float16 --latency-step 64 --latency-points 4 --check-ratios 0.25,0.5 \
    --out "$out/latency-gpu-resnet50-b256.json" --json "$out/profile-gpu-resnet50-b256.json" --overwrite --no-progress
# 4. pruning to 70% of the measured latency with 2:4 where it pays (--nm-where auto), on random 224x224 images
#    (speed does not depend on the data), reusing that table: which layers take 2:4, predicted vs measured
$py -c "import numpy as np; r = np.random.default_rng(0); np.savez('/tmp/rand224.npz', \
x=r.integers(0, 256, (320, 224, 224, 3), dtype=np.uint8), y=np.arange(320) % 10)"
run 120 $py -m hybridprune run --model torchvision:resnet50 --dataset npz:/tmp/rand224.npz --epochs 0 \
    --finetune-epochs 0 --metric l1 --target-latency 0.7 --latency-runtime torch --latency-batch 256 \
    --latency-dtype float16 --latency-step 64 --latency-points 4 --latency-table "$out/latency-gpu-resnet50-b256.json" \
    --calib-batches 1 --bn-recalib-batches 1 --device cuda --no-progress \
    --out /tmp/r50-auto --json "$out/auto-gpu-resnet50-b256.json" --overwrite
# 5. the four variants of the paper's AlexNet, 4x wider (CIFAR shape), and of ResNet-50 at 224x224, synthetic weights
run 60 $py -m hybridprune bench --synthetic --width 4 --batch-sizes 16,256,1024 --dtypes float16 --kernels fastest \
    --rounds 8 --calls 5 --no-progress --json "$out/bench-gpu-alexnet-w4.json" --overwrite
run 90 $py -m hybridprune bench --synthetic --model torchvision:resnet50 --image-size 224 --batch-sizes 1,32,128 \
    --dtypes float16 --kernels fastest --rounds 5 --calls 3 --no-progress \
    --json "$out/bench-gpu-resnet50-224.json" --overwrite
exit $status
