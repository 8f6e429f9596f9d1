#!/usr/bin/env bash
# The GPU measurements behind benchmarks/RESULTS.md, one phase per call on a machine with two
# H200s and no package index (the lent device): what each phase needs must already be there.
#   bash benchmarks/gpu_session.sh PHASE
#   PHASE: carry | mfu | scaling | vllm | split | tune | stage | layouts | gputests | lora |
#          ovt (issue #17: opd train vs TRL DistillationTrainer, WORKLOAD=S|L, ROWS=...)
# (The phases gkd, gkd2 and gkd3 ran benchmarks/opd_vs_trl.py, which composed opd's pieces in
# one process; it was retired on 2026-11-30 for `ovt`, which runs `opd train` itself.)
# Needs: .gpu-bundle (ray, deepspeed, ...; /work/shared/gpu/make-bundle.sh), .whl (trl 1.16.0,
# datasets 4.7.0, dill, multiprocess) for `mfu`; for `vllm` and `split`, vLLM 0.25.1 from
# /work/shared/gpu/make-vllm-stage.sh .vllm-stage: its three ~47 MB pieces are carried one per
# call (carry .vllm-stage/p1, then p2, then p3 with .vllm-stage/run), each copied to
# /tmp/vparts, and the call that finds all three assembles /tmp/vsite. Logs and JSON lines go
# to $OUT (at most 8 files come back from a call).
set -uo pipefail
phase=${1:?phase}
OUT=${OUT:-/tmp/opd-gpu-out}
mkdir -p "$OUT" /tmp/vparts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_HOST_IP=127.0.0.1 MASTER_ADDR=127.0.0.1
export PYTHONPATH=/tmp/site:$PWD
[ -d /tmp/site/deepspeed ] || bash .gpu-bundle/install.sh > /dev/null 2>&1
[ -d /tmp/site/trl ] || [ ! -d .whl ] || python3 -m pip install -q --no-index --no-deps \
  --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
# a vLLM piece carried by this call stays on the machine for the assembling call
for d in .vllm-stage/p*; do [ -d "$d" ] && cp -n "$d"/* /tmp/vparts/; done
[ -d .vllm-stage/run ] && mkdir -p /tmp/vrun && cp -n .vllm-stage/run/* /tmp/vrun/
B=benchmarks

vllm_env() {
  if [ ! -d /tmp/vsite/vllm ]; then
    mkdir -p /tmp/vsite
    cat ${VPARTS:-/tmp/vparts}/part_* | xz -d -T0 | tar -x -C /tmp/vsite || return 1
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/vsite \
      ${VRUN:-/tmp/vrun}/*.whl > /dev/null 2>&1
    rm -rf /tmp/vsite/flashinfer /tmp/vsite/flashinfer_python-*.dist-info
  fi
  export PYTHONPATH=/tmp/site:/tmp/vsite:$PWD VLLM_USE_V2_MODEL_RUNNER=0
  export VLLM_ENABLE_V1_MULTIPROCESSING=0  # engines in their actor's process (see above)
  export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_LOGGING_LEVEL=INFO
}

case $phase in
carry)  # nothing more: the lines above installed and kept what this call carried
  nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
  ls /tmp/vparts /tmp/vrun /tmp/site | head -50 > "$OUT/staged.txt" 2>&1 ;;
mfu)  # GPU 0: packing check + learner configurations; GPU 1: teacher budgets
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    > /dev/null 2>&1
  nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
  (export CUDA_VISIBLE_DEVICES=0
   python3 $B/packing_check.py --size qwen2.5-1.5b
   python3 $B/learner_step.py --size qwen2.5-1.5b --steps 4 \
     --configs 64x16 64x16:pad 64x32 64x16:zero1 64x64:ckpt) > "$OUT/learner.log" 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   python3 $B/teacher_scoring.py --size qwen2.5-7b --samples 64 --steps 3 \
     --budgets 32768 65536 131072
   python3 $B/teacher_scoring.py --size qwen2.5-7b --samples 64 --steps 3 \
     --budgets 65536 --topk-format tensor) > "$OUT/teacher.log" 2>&1 &
  wait ;;
tune)  # one GPU: packing check, learner variants with a profile, teacher profile and compile
  (timeout -s ABRT 330 python3 $B/packing_check.py --size qwen2.5-1.5b
   timeout -s ABRT 330 python3 $B/learner_step.py --size qwen2.5-1.5b --steps 4 --configs \
     64x16:zero1:prof 64x16:zero0 64x64:ckpt:zero1 64x32:ckpt:zero1 64x16:zero1:compile
  ) > "$OUT/tune_learner.log" 2>&1
  (timeout -s ABRT 120 python3 $B/teacher_scoring.py --size qwen2.5-7b --samples 64 --steps 3 \
     --budgets 65536 --topk-format tensor --profile
   timeout -s ABRT 150 python3 $B/teacher_scoring.py --size qwen2.5-7b --samples 64 --steps 3 \
     --budgets 65536 --topk-format tensor --compile) > "$OUT/tune_teacher.log" 2>&1 ;;
scaling)  # learner ranks: ZeRO-3 on 1 and 2 GPUs, ZeRO-2 on 2 (same per-rank batch)
  python3 $B/learner_step.py --size qwen2.5-1.5b --steps 4 --configs 64x16:zero3 \
    > "$OUT/scaling.log" 2>&1
  python3 $B/learner_step.py --size qwen2.5-1.5b --steps 4 --world 2 \
    --configs 64x16:zero3 64x16:zero2 >> "$OUT/scaling.log" 2>&1 ;;
vllm)  # decode + colocated sync
  vllm_env || exit 1
  CUDA_VISIBLE_DEVICES=0 timeout -s ABRT 330 python3 $B/rollout_decode.py --size student-0.6b \
    --batches 8 64 256 > "$OUT/rollout.log" 2>&1 ;;
split)  # 1 learner GPU + 1 rollout/teacher GPU over NCCL, then the same all on one GPU
  vllm_env || exit 1
  NCCL_DEBUG=INFO timeout -s ABRT 200 python3 $B/split_step.py --layout split > "$OUT/split.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout -s ABRT 170 python3 $B/split_step.py --layout colocated \
    >> "$OUT/split.log" 2>&1 ;;
stage)  # carry a vLLM piece (above) and, while here, the learner at larger micro-batches
  timeout 60 python3 -c "import ray; ray.init(include_dashboard=False); \
print('ray resources', ray.cluster_resources())" > "$OUT/stage_ray.log" 2>&1
  if [ -n "${CONFIGS:-}" ]; then
    timeout -s ABRT ${LIMIT:-150} python3 $B/learner_step.py --size qwen2.5-1.5b --steps 4 \
      --configs $CONFIGS > "$OUT/stage_learner.log" 2>&1
  else  # learner ranks as Ray actors, the way opd train starts them (ZeRO-3 over NCCL)
    timeout -s ABRT ${LIMIT:-150} python3 $B/ray_learners.py --world 2 --steps 4 \
      > "$OUT/stage_ray_learners.log" 2>&1
  fi ;;
layouts)  # opd train itself on 1 and 2 GPUs (issue #8): LAYOUTS picks them
  vllm_env || exit 1
  timeout -s ABRT ${LIMIT:-560} python3 $B/train_layouts.py --layouts ${LAYOUTS:-2-colocated} \
    --timeout ${LAYOUT_LIMIT:-260} > "$OUT/layouts.log" 2>&1 ;;
gputests)  # the gpu test tier (tests/gpu): kernels, then opd train with each weight transport
  vllm_env || exit 1
  export VLLM_LOGGING_LEVEL=WARNING
  timeout -s ABRT ${LIMIT:-540} python3 -m pytest ${TESTS:-tests/gpu} -v -s -p no:cacheprovider \
    -rA > "$OUT/gpu_tests.log" 2>&1 ;;
lora)  # LoRA students (issue #22): the GPU test layouts, then opd train with adapter pushes
  # against full-weight CUDA IPC pushes on the same 0.63 B student (needs peft in .whl)
  vllm_env || exit 1
  export VLLM_LOGGING_LEVEL=WARNING
  timeout -s ABRT ${TEST_LIMIT:-240} python3 -m pytest tests/gpu/test_train_gpu.py \
    -k "${TESTS_K:-lora or defaults}" -v -s -p no:cacheprovider -rA > "$OUT/gpu_tests_lora.log" 2>&1
  for rank in 0 ${LORA_RANK:-16}; do
    lay=1-colocated; [ "$rank" = 0 ] && lay=1-colocated-ipc
    timeout -s ABRT ${LAYOUT_LIMIT:-170} python3 $B/train_layouts.py --layouts $lay --zero 0 \
      --steps ${STEPS:-5} --lora-rank $rank --root /tmp/lora-lay --timeout 160 \
      > "$OUT/layouts_lora$rank.log" 2>&1
  done ;;
ovt)  # opd train vs TRL DistillationTrainer (vLLM colocated), one process per row, one GPU
  vllm_env || exit 1
  # TRL's Trainer wraps the model in nn.DataParallel when a process sees several GPUs
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
  export VLLM_LOGGING_LEVEL=WARNING
  timeout -s TERM ${LIMIT:-590} python3 $B/opd_vs_trl_train.py --workload ${WORKLOAD:-S} \
    --zero ${ZERO:-0} --root /tmp/ovt-${WORKLOAD:-S} --row-timeout ${ROW_LIMIT:-200} \
    ${ROWS:+--rows $ROWS} --out "$OUT/${WORKLOAD:-S}" > "$OUT/ovt-${WORKLOAD:-S}.log" 2>&1
  grep -h '^|' "$OUT"/*.md ;;
*) echo "unknown phase $phase" >&2; exit 2 ;;
esac
grep -h '^{' "$OUT"/*.log | cut -c1-1500
