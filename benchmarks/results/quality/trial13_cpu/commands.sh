#!/bin/bash
# Trial 13 (CPU): seed 000's ablations of DCW at the 2k stage, run against run. Each run resumes
# trial 12's DCW step-1000 checkpoint (copy 128x600 -> 256x400, the same weights for every run of
# a seed) and trains 150 steps at 2k with one setting changed; then answer loss and retrieval
# accuracy on 64 held-out 2k rows. From the repository root, after trial12_cpu/commands.sh.
set -e
T=benchmarks/results/quality/trial12_cpu
O="device=cpu attention.impl=torch logging.progress=false checkpoint.every=50 checkpoint.keep_last=20 data.eval_rows=4 checkpoint.resume=auto"
run() { seed=$1; name=$2; shift 2; R=runs/t13/$name; mkdir -p $R/checkpoints
  cp -r runs/t12/dcw_s${seed}/checkpoints/step00001000 $R/checkpoints/
  echo step00001000 > $R/checkpoints/latest
  dcwdist train $T/c128_256_2k_dcw.yaml $O seed=$seed "$@" --run-dir $R; }
run 0 dcw_s0_t10_20_70 segmentation.core_ratio=0.1 segmentation.buffer_ratio=0.2   # ablation_tiers_10_20_70.yaml
run 0 dcw_s0_t30_30_40 segmentation.core_ratio=0.3 segmentation.buffer_ratio=0.3   # ablation_tiers_30_30_40.yaml
run 0 dcw_s0_pool16 attention.summary_pool=16                                       # ablation_pool16.yaml
run 0 dcw_s0_pool1 attention.summary_pool=1                                         # ablation_pool1.yaml
run 1 dcw_s1_t10_20_70 segmentation.core_ratio=0.1 segmentation.buffer_ratio=0.2
# trial 12's runs are the references (dcw_s0_2k = runs/t12/dcw_s0, ...), measured the same way
for r in runs/t12/{dcw,dense}_s{0,1} runs/t12/window512_s0 runs/t13/*; do
  python benchmarks/length_transfer.py $r --checkpoint step00001150 --lengths 2k --rope none --rows 64 \
      device=cpu attention.impl=torch --out benchmarks/results/quality/trial13_cpu/acc64.jsonl
done
python benchmarks/length_transfer.py --plot benchmarks/results/quality/trial13_cpu/acc64.jsonl --lengths 2k \
    --png benchmarks/results/quality/trial13_cpu/by_distance.png
python benchmarks/length_transfer.py --plot benchmarks/results/quality/trial13_cpu/acc64.jsonl --lengths 2k --metric acc \
    --png benchmarks/results/quality/trial13_cpu/acc_by_distance.png
# Shared start (seed 0): trial 12's DCW s0 weights at step 1000, exported without the scorer and
# gates; dense and DCW each train 2k x150 from them (fresh optimizer, DCW's scorer from init)
dcwdist hf-export runs/t12/dcw_s0 runs/t13/hf_dcw_s0_1000 --checkpoint step00001000 --dtype float32
for k in dense dcw; do
  OMP_NUM_THREADS=1 dcwdist train benchmarks/results/quality/trial13_cpu/shared_start_2k_$k.yaml device=cpu \
      attention.impl=torch logging.progress=false checkpoint.every=50 checkpoint.keep_last=20 data.eval_rows=4 \
      seed=0 model.init_from=runs/t13/hf_dcw_s0_1000 --run-dir runs/t13/shared_s0_$k
  for c in step00000100 step00000150; do
    python benchmarks/length_transfer.py runs/t13/shared_s0_$k --checkpoint $c --lengths 2k --rope none --rows 64 \
        device=cpu attention.impl=torch --out benchmarks/results/quality/trial13_cpu/shared_start.jsonl
  done
done
# Shared starts, continued (2026-12-08): seed 1 from dense's step-1000 weights, seed 0 from dense's
# weights (a weaker start), a 256-token window from all three starts (trial 12's estimate of DCW's
# FLOPs at 2k; it measures 48%), and CAA from the first
dcwdist hf-export runs/t12/dense_s1 runs/starts/dense_s1 --checkpoint step00001000 --dtype float32
dcwdist hf-export runs/t12/dense_s0 runs/starts/dense_s0 --checkpoint step00001000 --dtype float32
O="device=cpu attention.impl=torch logging.progress=false checkpoint.every=50 checkpoint.keep_last=20 data.eval_rows=4"
S=benchmarks/results/quality/trial13_cpu
train() { OMP_NUM_THREADS=1 dcwdist train $S/shared_start_2k_$1.yaml $O seed=$2 model.init_from=$3 --run-dir runs/t13/$4; }
train dense 1 runs/starts/dense_s1 shared_s1_dense;  train dcw 1 runs/starts/dense_s1 shared_s1_dcw
train window256 0 runs/t13/hf_dcw_s0_1000 shared_s0_window256;  train window256 1 runs/starts/dense_s1 shared_s1_window256
train dense 0 runs/starts/dense_s0 shared_s0_densestart_dense;  train dcw 0 runs/starts/dense_s0 shared_s0_densestart_dcw
for r in shared_s1_dense shared_s1_dcw shared_s0_window256 shared_s1_window256 shared_s0_densestart_dense shared_s0_densestart_dcw; do
  for c in step00000100 step00000150; do
    python benchmarks/length_transfer.py runs/t13/$r --checkpoint $c --lengths 2k --rope none --rows 64 \
        device=cpu attention.impl=torch --out $S/shared_start.jsonl
  done
done
train window256 0 runs/starts/dense_s0 shared_s0_densestart_window256;  train caa 0 runs/t13/hf_dcw_s0_1000 shared_s0_caa
for r in shared_s0_caa shared_s0_densestart_window256; do for c in step00000100 step00000150; do
  python benchmarks/length_transfer.py runs/t13/$r --checkpoint $c --lengths 2k --rope none --rows 64 device=cpu attention.impl=torch --out $S/shared_start.jsonl
done; done
python benchmarks/length_transfer.py --plot $S/shared_start.jsonl --lengths 2k --metric acc --png $S/shared_start_acc.png --select "shared_s0_dense@0150 rope none$,shared_s0_dcw@0150 rope none$,shared_s0_window256@0150 rope none$,shared_s0_caa@0150 rope none$,shared_s1_dense@0150 rope none$,shared_s1_dcw@0150 rope none$,shared_s1_window256@0150 rope none$,shared_s0_densestart_dense@0150 rope none$,shared_s0_densestart_dcw@0150 rope none$,shared_s0_densestart_window256@0150 rope none$"
