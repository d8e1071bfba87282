#!/usr/bin/env bash
# Installs has-sweep on a node, the same way everywhere: cluster.yaml's setup_commands (ray up),
# the KubeRay image (cluster/Dockerfile) and the ray-up test run this one command.
# torch, torchvision, Ray and MLflow are pinned by constraints.txt to the versions the tests ran
# with (the image's Ray is not replaced; every node gets the same torch, not "the newest today").
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python -m pip install --quiet --constraint "$repo/cluster/constraints.txt" -e "$repo[cluster]"
