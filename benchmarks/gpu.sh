#!/usr/bin/env bash
# Every GPU check in one script, for a machine with an NVIDIA GPU and PyTorch already installed.
# Installs nothing, needs no network; its timeouts sum to 590 s (under the 600 s of one device call).
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
run 90 $py -m pytest -q -m gpu tests/test_sparse.py -p no:cacheprovider

# 2. where 2:4 starts to pay: single layers, dense cuDNN/cuBLAS vs cuSPARSELt
run 120 $py benchmarks/layers.py --out "$out/layers-gpu.json"

# 3. the four variants of the paper's AlexNet (CIFAR shape) and of a 4x wider one, synthetic weights
for width in 1 4; do
  run 100 $py -m hybridprune bench --synthetic --width "$width" --batch-sizes 1,16,64,256,1024 \
      --dtypes float16,bfloat16 --kernels fastest --rounds 8 --calls 5 --no-progress \
      --json "$out/bench-gpu-alexnet-w${width}.json" --overwrite
done
# MNIST shape (1x28x28), the paper's first dataset
run 50 $py -m hybridprune bench --synthetic --channels 1 --image-size 28 --batch-sizes 64,1024 \
    --dtypes float16 --kernels fastest --rounds 8 --calls 5 --no-progress \
    --json "$out/bench-gpu-alexnet-mnist.json" --overwrite
# 4. a real ImageNet-shape network (torchvision ResNet-50 at 224x224, random weights): where 2:4 convs are large
run 90 $py -m hybridprune bench --synthetic --model torchvision:resnet50 --image-size 224 --batch-sizes 1,32,128 \
    --dtypes float16 --kernels fastest --rounds 5 --calls 3 --no-progress \
    --json "$out/bench-gpu-resnet50-224.json" --overwrite
# 5. fine-tuning speed per precision (fit with 2:4 masks held) against a plain PyTorch loop
run 40 $py benchmarks/finetune.py --device cuda --images 4096 --rounds 3 --out "$out/finetune-gpu.json"
exit $status
