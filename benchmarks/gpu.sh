#!/usr/bin/env bash
# The GPU checks of 2:4 inference and GPU precisions, in one script of at most 8 minutes on one H100 (its timeouts
# sum to 450 s).
# Needs an NVIDIA GPU, PyTorch with CUDA and cuSPARSELt, and this repository: no TensorRT, no network, installs
# nothing. Each step is its own process, so a fault in one (a CUDA error poisons its process) spares the others.
#   bash benchmarks/gpu.sh [OUT_DIR]        (default OUT_DIR: docs/results/gpu-<device>/, e.g. gpu-h100)
# tests/test_sparse_scripts.py checks this script's syntax and every command's --help on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
device=$($py -c "import torch; print(next((w for w in torch.cuda.get_device_name().lower().replace('-', ' ').split() \
if any(c.isdigit() for c in w)), 'gpu') if torch.cuda.is_available() else 'none')")
[ "$device" = none ] && { echo "no CUDA GPU here: benchmarks/gpu.sh needs one"; exit 2; }
out="${1:-docs/results/gpu-$device}"
mkdir -p "$out"
exec > >(tee "$out/gpu.log") 2>&1  # everything said, also in the results
echo "bash benchmarks/gpu.sh $*  # $(git rev-parse --short HEAD 2>/dev/null || echo no-git), $(date -u +%FT%TZ)" \
    | tee "$out/command.txt"
status=0
run() { echo "+ $*"; timeout "$1" "${@:2}" || { echo "FAILED ($?): ${*:2}"; status=1; }; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv || true
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cusparselt', \
torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None, \
'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(), torch.cuda.get_device_capability())"

# 1. correctness: every GPU test (sparse layers on every layout, whole models in fp16/bf16 against dense); the
#    CUDA-graph replay of cuSPARSELt layers alone first, as it once faulted on an H200
run 40 $py -m pytest -q -m gpu tests/test_sparse.py -k cuda_graph -p no:cacheprovider
run 140 $py -m pytest -q -m gpu tests -k "not cuda_graph" -p no:cacheprovider --junitxml "$out/gpu-tests.xml"

# 2. where 2:4 pays: 1x1 convs (ResNet-50 widths and sides) and linears, cuDNN/cuBLAS against cuSPARSELt, kernel
#    time (CUDA-graph replay), eager time and host time, the chosen algorithm against algorithm 0; two 3x3 rows
run 90 $py benchmarks/layers.py --out "$out/layers.json" --conv1x1-channels 256,512,1024,2048 \
    --conv3x3-channels 1024 --linear-features 1024,4096,8192 --batch-sizes 64,256 --repeats 20

# 3. torchvision ResNet-50 at 224x224, batch 256, fp16 and bf16: the four variants (dense, filter, 2:4, hybrid) with
#    each 2:4 layer on the faster kernel measured, eager and CUDA-graph times, and why each layer runs what it runs
run 150 $py -m hybridprune bench --synthetic --model torchvision:resnet50 --image-size 224 --batch-sizes 256 \
    --dtypes float16,bfloat16 --kernels fastest --rounds 3 --calls 2 --no-progress \
    --json "$out/bench-resnet50-224-b256.json" --overwrite

# 4. TensorRT fp16 and int8 (a QDQ graph) with sparse weights enabled, where TensorRT is installed (it was on none of
#    the machines used so far, so this step has never run)
if $py -c "import tensorrt" 2>/dev/null; then
run 30 $py -m hybridprune bench --synthetic --model resnet20 --batch-sizes 64 --device cuda --rounds 3 --calls 2 \
    --runtimes tensorrt:fp16,tensorrt:int8 --no-progress --json "$out/bench-resnet20-tensorrt.json" --overwrite
else
    echo "TensorRT is not installed here: its fp16, int8 and 2:4 rows are not measured"
fi
echo "results in $out (exit $status)"
exit $status
