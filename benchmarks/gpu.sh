#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one run, for a session that is lent a GPU:
#   bash benchmarks/gpu.sh > gpu_figures.txt 2>&1
# About 8 minutes on an H200 (most of it torch.compile's warm-ups); each line is printed as it is
# measured, so a run cut short still leaves its figures.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "## hide on the GPU"
python benchmarks/bench_hide.py --device cuda --repeats 21
echo "## input pipeline: CPU per core, and nvjpeg on the GPU"
python benchmarks/bench_input.py --count 120 --repeats 3 --gpu-decode
echo "## MaxBoxAccV2 evaluator (CPU of the GPU node)"
python benchmarks/bench_max_box_acc.py --count 200 --interval 0.001
echo "## training images/s, bf16 autocast, channels_last, with and without torch.compile"
for backbone in resnet50_cam vgg16_gap inception_v3_cam googlenet_gap alexnet_gap efficientnet_lite0_cam; do
  size=224; [[ $backbone == inception_v3_cam ]] && size=299
  for compile in "" "--compile"; do
    timeout 300 python benchmarks/bench_train_step.py --backbone $backbone --size $size --batch 128 \
      --classes 1000 --device cuda --amp bf16 --channels-last $compile --steps 10 --repeats 7 \
      || echo "$backbone $compile: failed or over 300 s"
  done
done
