#!/usr/bin/env bash
# One device call: bench/train.py (throughput, MFU, infctx memory) on GPU 0, then, on a 2-GPU machine,
# fit.py on 1 GPU vs `fabric run --devices 2 --strategy ddp` with the same global batch (20 steps).
# Usage (on the GPU machine, repo root): OUT=dir DATA=corpus bash bench/train_gpu.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}; DATA=${DATA:-data/sample}
mkdir -p "$OUT"
nvidia-smi -L
timeout 330 python3 bench/train.py --out "$OUT" 2>&1 | tee "$OUT/train.log" | grep -v "^ *$"
NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -ge 2 ]; then
  R=/tmp/ddp; rm -rf $R
  S="--set train.tensorboard=false --set sample.tokens=0 --set train.ckpt_every=0 --set train.val_every=10 --set data.val_batches=2"
  for P in bf16-mixed 32-true; do
    python3 trainer/fit.py --config trainer/configs/debug.yaml --data "$DATA" --run-dir $R/one-$P --max-steps 20 \
      $S --set train.precision=$P --set data.micro_batch_size=8 > $R-one-$P.log 2>&1 || tail -20 $R-one-$P.log
    python3 -m lightning.fabric.cli run --devices 2 --strategy ddp --precision $P trainer/fit.py --config trainer/configs/debug.yaml \
      --data "$DATA" --run-dir $R/two-$P --max-steps 20 $S --set data.micro_batch_size=4 > $R-two-$P.log 2>&1 || tail -20 $R-two-$P.log
  done
  python3 - "$R" "$OUT" <<'PY'
import csv, json, sys
R, OUT = sys.argv[1], sys.argv[2]
res = {}
for p in ("bf16-mixed", "32-true"):
    try:
        rows = [list(csv.DictReader(open(f"{R}/{k}-{p}/metrics.csv"))) for k in ("one", "two")]
    except FileNotFoundError as e:
        res[p] = {"error": str(e)}
        continue
    a = [float(r["loss"]) for r in rows[0]]; b = [float(r["loss"]) for r in rows[1]]
    res[p] = {"steps": len(a), "max_abs_diff": max(abs(x - y) for x, y in zip(a, b)), "one_gpu": a, "two_gpu_ddp": b,
              "val_one": [r["val_loss"] for r in rows[0] if r["val_loss"]], "val_two": [r["val_loss"] for r in rows[1] if r["val_loss"]],
              "pass_1e-3": len(a) == len(b) == 20 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-3}
print(json.dumps({k: {kk: v[kk] for kk in v if kk not in ("one_gpu", "two_gpu_ddp")} for k, v in res.items()}))
json.dump(res, open(f"{OUT}/ddp.json", "w"), indent=1)
PY
fi
