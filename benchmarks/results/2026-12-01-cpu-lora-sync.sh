cd /work/main
for rank in 16 0; do
  rm -rf /tmp/lorameas/r$rank
  timeout 1200 .venv/bin/opd train recipes/reverse_kl/smollm2-135m-arith-lora.yaml \
    run.output_dir=/tmp/lorameas/r$rank teacher.path=registry:smollm2-135m-instruct \
    learner.lora.rank=$rank trainer.steps=4 eval.every=0 checkpoint.every=0 \
    checkpoint.export_student=false run.progress=false > /tmp/lorameas/r$rank.log 2>&1
  echo "rank $rank rc=$?" >> /tmp/lorameas/done
done
