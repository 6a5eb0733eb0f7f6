#!/bin/bash
# Trial 12 (CPU): copy 128x600 -> 256x400 -> 2k x150 for dense, window (512 at 2k) and DCW,
# seeds 0 and 1; answer loss by distance at 2k (and 8k, zero-shot). From the repository root.
# Runs of trial 11 (dense s0/s1, DCW s0) provide the step-1000 checkpoints; the same recipes
# run from scratch reach them (deterministic on CPU).
set -e
T=benchmarks/results/quality/trial12_cpu
O="device=cpu attention.impl=torch logging.progress=false checkpoint.every=50 checkpoint.keep_last=20 data.eval_rows=4 checkpoint.resume=auto"
for s in 0 1; do
  dcwdist train $T/c128_256_2k_dense.yaml $O seed=$s --run-dir runs/t12/dense_s${s}
  dcwdist train $T/c128_256_2k_dcw.yaml $O seed=$s --run-dir runs/t12/dcw_s${s}
done
# window 512 at 2k: its copy and 256 stages are dense's (a 512 window covers those rows)
mkdir -p runs/t12/window512_s0/checkpoints
cp -r runs/t12/dense_s0/checkpoints/step00001000 runs/t12/window512_s0/checkpoints/
echo step00001000 > runs/t12/window512_s0/checkpoints/latest
dcwdist train $T/c128_256_2k_window.yaml $O seed=0 attention.window=512 --run-dir runs/t12/window512_s0
for r in runs/t12/*; do
  python benchmarks/length_transfer.py $r --checkpoint step00001150 --lengths 2k --rope none --rows 32 device=cpu attention.impl=torch --out $T/transfer.jsonl
done
for r in runs/t12/dcw_s0 runs/t12/dense_s0; do
  python benchmarks/length_transfer.py $r --checkpoint step00001150 --lengths 8k --rope none --rows 16 device=cpu attention.impl=torch --out $T/transfer.jsonl
done
python benchmarks/length_transfer.py --plot $T/transfer.jsonl --lengths 2k,8k --png $T/by_distance.png
