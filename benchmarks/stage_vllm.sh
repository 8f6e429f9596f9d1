#!/usr/bin/env bash
# Re-packs the vLLM stage of /work/shared/gpu/make-vllm-stage.sh into two pieces (one per
# device call, each under the 64 MiB a call carries with the working tree), leaving out what an
# offline engine does not load: flashinfer (its JIT compiles at start-up), the Rust frontend
# binary, Mistral's tekken tokenizer files and the OpenAI server's static files.
#   bash benchmarks/stage_vllm.sh SRC_STAGE DEST   -> DEST/p1/part_00, DEST/p2/part_01, DEST/run
# On the device: cat the parts in order | xz -d | tar -x -C /tmp/vsite, then pip install
# DEST/run/*.whl --target /tmp/vsite (benchmarks/gpu_session.sh does this).
set -euo pipefail
src=${1:?src}; dest=${2:?dest}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cat "$src"/p*/part_* | xz -d -T0 | tar -x -C "$work"
rm -rf "$work"/flashinfer "$work"/flashinfer_python-*.dist-info "$work"/vllm/vllm-rs \
  "$work"/mistral_common/data/tekken_*.json "$work"/vllm/entrypoints/serve/instrumentator/static
mkdir -p "$dest"
tar -C "$work" -cf - . | xz -T0 -6 > "$dest/vsite.tar.xz"
size=$(stat -c %s "$dest/vsite.tar.xz")
(cd "$dest" && split -b $(( (size + 1) / 2 + 1 )) -d vsite.tar.xz part_ && rm vsite.tar.xz)
mkdir -p "$dest/p1" "$dest/p2" "$dest/run"
mv "$dest/part_00" "$dest/p1/"; mv "$dest/part_01" "$dest/p2/"
cp "$src"/run/*.whl "$dest/run/"
du -sh "$dest"/*
