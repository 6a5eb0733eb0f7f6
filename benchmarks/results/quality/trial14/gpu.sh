#!/bin/bash
# Trial 14 (one GPU call): every kind continues from the same start, so at 2k and 8k the kinds
# differ only in attention. Four starts: trial 12's step-1000 checkpoints (copy 128x600 ->
# 256x400 on CPU) of dense and DCW, seeds 0 and 1, exported with
#   dcwdist hf-export RUN runs/starts/NAME --checkpoint step00001000 --dtype float32
# (DCW's scorer and gates are not exported: they start from init, as does the optimizer).
# Five kinds per start (dense, window 256, CAA, DCW learned, DCW oracle) = 20 runs, plus DCW from
# dcw_s0 a second time (same seed: with deterministic: true the two must agree bit for bit).
# Then retrieval accuracy and attention FLOPs at 2k and 8k (benchmarks/length_transfer.py), and
# the runs packed for the way back.
#   . benchmarks/gpu_env.sh && bash benchmarks/results/quality/trial14/gpu.sh   (carry .whl runs/starts)
set -u
T=benchmarks/results/quality/trial14
OUT=${OUT:-/tmp/out14}
STOP=${STOP:-400}        # seconds of training before unfinished runs are stopped
EVAL_S=${EVAL_S:-100}
ROWS=${ROWS:-64}
DEV=${DEV:-cuda}
EXTRA=${EXTRA:-}         # more overrides, all runs (a CPU smoke: small stages.N.steps)
mkdir -p /tmp/q14 "$OUT"
export OMP_NUM_THREADS=1  # 21 processes on 16 cores: the GPU does the work
KINDS="$T/shared_dense.yaml $T/shared_window256.yaml $T/shared_caa.yaml $T/shared_dcw.yaml $T/shared_dcw_oracle.yaml"
drive() {  # start seed out recipes...
    local start=$1 seed=$2 out=$3; shift 3
    python3 benchmarks/quality.py "$@" --seeds "$seed" --tag "from_$start" --no-eval \
        --override "model.init_from=runs/starts/$start" --override checkpoint.every=50 \
        --override device=$DEV $EXTRA --parallel 5 --out "$out" --stop-after-s "$STOP" \
        > "$out.driver.log" 2>&1
}
for st in dcw_s0:0 dense_s0:0 dense_s1:1 dcw_s1:1; do
    drive "${st%:*}" "${st#*:}" "/tmp/q14/${st%:*}" $KINDS &
done
drive dcw_s0 0 /tmp/q14/rep "$T/shared_dcw.yaml" &
wait
tail -n 30 /tmp/q14/*.driver.log > "$OUT/drivers.log"
# Retrieval accuracy, answer loss by distance and attention FLOPs, every run at once
for r in /tmp/q14/*/runs/*/; do
    r=${r%/}; [ -f "$r/config.yaml" ] || continue
    ck=""; [ -f "$r/model.pt" ] || ck="--checkpoint $(cat "$r/checkpoints/latest" 2>/dev/null)"
    tag=$(basename "$(dirname "$(dirname "$r")")")_$(basename "$r")
    timeout "$EVAL_S" python3 benchmarks/length_transfer.py "$r" $ck --lengths 2k,8k --rope none \
        --rows $ROWS device=$DEV --out "/tmp/q14/acc_$tag.jsonl" > "/tmp/q14/acc_$tag.log" 2>&1 &
done
wait
cat /tmp/q14/acc_*.jsonl > "$OUT/acc.jsonl" 2>/dev/null
tail -n 3 /tmp/q14/acc_*.log > "$OUT/acc_logs.txt" 2>/dev/null
python3 benchmarks/pack_runs.py /tmp/q14/{dcw_s0,dense_s0,dense_s1,dcw_s1,rep}/runs --dest "$OUT"
wc -l "$OUT/acc.jsonl"; grep -E '"rc"|stop' "$OUT/drivers.log" | head -40
