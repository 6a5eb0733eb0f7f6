"""`dcwdist hf-import` and `dcwdist hf-export` (registered by dcwdist/cli.py)."""
from __future__ import annotations

import argparse

IMPORT_HELP = """Import a local Hugging Face Llama or Qwen2 checkpoint (config.json +
model.safetensors, or shards listed in model.safetensors.index.json; pickle .bin files are never
read) into a dcwdist run directory: RUN_DIR/config.yaml (the recipe, with the model shape taken
from config.json and model.init_from=HF_DIR) and RUN_DIR/model.pt.

The recipe picks the attention kind. Every HF tensor must find its place and every dcwdist
parameter must be filled, except the dcwdist-only ones, which keep their init: the DCW scorer
(segmenter.*), DCW's per-layer alpha (0: the cross-tier residual starts switched off), CAA's
gate. RoPE: default, linear and YaRN scaling map exactly.

Examples:
  dcwdist hf-import ~/models/Qwen2.5-0.5B runs/qwen_dcw --recipe recipes/finetune_hf_dcw.yaml
  dcwdist hf-import ~/models/tiny-llama runs/check attention.kind=dense
Training can also load the checkpoint itself: dcwdist train RECIPE model.init_from=HF_DIR."""

EXPORT_HELP = """Export a dcwdist run to a directory that
transformers.AutoModelForCausalLM.from_pretrained loads: config.json (LlamaForCausalLM, or
Qwen2ForCausalLM when the model has q/k/v bias) and model.safetensors (sharded with an index
above --max-shard-gb), plus the tokenizer files of the checkpoint the run was imported from
(model.init_from), when it is still there.

Weights: RUN_DIR/model.pt (written at the end of training, or by hf-import), else the newest
complete checkpoint; or pick one with --checkpoint latest|stepNNNNNNNN. ZeRO-1/2/3 checkpoints
(sharded over ranks) are merged to fp32 with DeepSpeed's zero_to_fp32. RoPE is the one in force
at that point: the stage's (the last stage's for a finished run; the imported model's own for an
hf-import) - YaRN/linear scaling is written as rope_scaling, NTK as an equivalent rope_theta.

dcwdist-only parameters (the DCW scorer and alpha, CAA gates) are dropped: the exported model
runs dense attention, which is what HF Llama/Qwen2 implement.

Examples:
  dcwdist hf-export runs/qwen_dcw out/qwen_dcw_hf --dtype bfloat16
  dcwdist hf-export runs/zero3_run out/hf --checkpoint step00000200"""


def cmd_import(args) -> int:
    from dcwdist.hf.convert import import_to_run

    info = import_to_run(args.hf_dir, args.run_dir, args.recipe, tuple(args.overrides))
    rope = info["rope"]
    print(f"imported {args.hf_dir}: {info['params'] / 1e6:.2f}M params, {info['n_layers']} "
          f"layers, rope base {rope.base:g} {rope.scaling} x{rope.factor:g}, attention="
          f"{info['attention']}; {len(info['fresh'])} dcwdist-only tensor(s) at init -> "
          f"{args.run_dir}/model.pt")
    return 0


def cmd_export(args) -> int:
    from dcwdist.hf.convert import export_run

    info = export_run(args.run_dir, args.out_dir, args.checkpoint, args.dtype, args.max_shard_gb)
    rope = info["rope"]
    dropped = (f"; dropped {len(info['dropped'])} dcwdist-only tensor(s) (scorer, alpha, gates)"
               if info["dropped"] else "")
    print(f"exported {info['source']} as {info['architecture']} ({info['tensors']} tensors, "
          f"{args.dtype}, rope {rope.scaling} x{rope.factor:g}) -> {args.out_dir}: "
          f"{', '.join(info['files'])}{dropped}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("hf-import", help="import a local HF Llama/Qwen2 checkpoint into a run dir",
                       description=IMPORT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="local HF checkpoint directory (config.json + *.safetensors)")
    p.add_argument("run_dir", help="dcwdist run directory to write (config.yaml, model.pt)")
    p.add_argument("--recipe", default=None,
                   help="YAML recipe giving attention kind, stages, ... (default: the built-in "
                        "defaults, dense attention)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. attention.kind=dcw")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("hf-export", help="export a run (model.pt or ZeRO checkpoint) to HF format",
                       description=EXPORT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run directory written by `dcwdist train` or `hf-import`")
    p.add_argument("out_dir", help="output directory (config.json + model.safetensors)")
    p.add_argument("--checkpoint", default="auto",
                   help="auto (model.pt, else the newest checkpoint) | model.pt | latest | a tag "
                        "such as step00000040")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written tensors (default float32, lossless)")
    p.add_argument("--max-shard-gb", type=float, default=5.0,
                   help="shard the safetensors above this size in GiB (default 5)")
    p.set_defaults(func=cmd_export)
