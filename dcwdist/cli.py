"""`dcwdist` command line: train, eval, data."""
from __future__ import annotations

import argparse
import os
import sys

from dcwdist.configtree import ConfigError

DESCRIPTION = """dcwdist trains decoder LMs on very long sequences with Dynamic Context Windows
attention. Subcommands:
  train RECIPE [key=value ...]   run a YAML recipe (stages of growing length); dotted overrides
                                 such as attention.window=64 stages.0.steps=5
  eval RUN_DIR [--suite ...]     loss-by-position table of a finished run's model; with
                                 --suite/--ruler: needle, kv, fact, qa, ppl, speed, RULER files
  generate RUN_DIR --prompt-file F   greedy generation on an evicting KV cache
  submit RECIPE --to local|mpi|slurm|ray   launch a recipe on N ranks (sbatch, ray, mpirun)
  status JOB / cancel JOB        follow or stop a Slurm job (cancel --signal USR1: checkpoint)
  hf-import / hf-export          Hugging Face Llama/Qwen2 checkpoints in and out
  tb RUN_DIR                     last value of every TensorBoard scalar of a run, as a table
  data ...                       data tools (synthetic documents, shards, tokenizers)
Run `dcwdist SUBCOMMAND --help` for details."""


def cmd_train(args) -> int:
    from dcwdist.config import load_config
    from dcwdist.train.trainer import Trainer

    cfg = load_config(args.recipe, args.overrides)
    trainer = Trainer(cfg, run_dir=args.run_dir)
    summary = trainer.fit()
    if summary["first_loss"] is not None:
        trainer.echo(f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} over "
                     f"{summary['steps']} steps")
    return 0


def cmd_eval(args) -> int:
    import os

    import torch

    from dcwdist.config import load_config
    from dcwdist.train.trainer import Trainer

    if args.suite is not None or args.ruler:
        return _eval_suite(args)
    cfg_path = os.path.join(args.run_dir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise ConfigError(f"{args.run_dir} has no config.yaml: not a dcwdist run directory")
    cfg = load_config(cfg_path, args.overrides)
    cfg.logging.tensorboard = False
    trainer = Trainer(cfg, run_dir=args.run_dir)
    state = torch.load(os.path.join(args.run_dir, "model.pt"), map_location=trainer.device,
                       weights_only=True)
    trainer.model.load_state_dict(state)
    trainer.apply_stage(cfg.stages[-1])
    trainer.evaluate(cfg.stages[-1])
    return 0


def _cache_args(model, args):
    import torch

    from dcwdist.eval.kvcache import HeadBudget
    from dcwdist.eval.suite import cache_config_for

    cache = cache_config_for(model, args.policy, args.budget, args.budget_scope,
                             args.recent_ratio)
    head_budget = None
    if args.budget_weights:
        head_budget = HeadBudget(model.cfg.n_layers, model.cfg.n_kv_heads)
        head_budget.logits.data.copy_(torch.load(args.budget_weights, weights_only=True))
    return cache, head_budget


def _eval_suite(args) -> int:
    import os

    from dcwdist.eval.suite import (SuiteConfig, load_run, parse_lengths, report_markdown,
                                    run_suite)

    model, cfg, tok = load_run(args.run_dir, args.overrides)
    suites = [s for s in (args.suite or "").split(",") if s]
    scfg = SuiteConfig(suites=suites, lengths=parse_lengths(args.lengths),
                       depths=[float(d) for d in args.depths.split(",")], samples=args.samples,
                       qa_samples=args.qa_samples, max_new_tokens=args.max_new_tokens,
                       seed=args.seed, ruler=args.ruler or "", ruler_metric=args.ruler_metric,
                       ruler_limit=args.ruler_limit, progress=not args.no_progress)
    cache, head_budget = _cache_args(model, args)
    out = args.out or os.path.join(args.run_dir, "eval_suite")
    bf16 = model.norm.weight.device.type == "cuda" and cfg.dtype in ("auto", "bfloat16")
    res = run_suite(model, tok, cfg.data, scfg, cache, out, head_budget, autocast_bf16=bf16)
    print(report_markdown(res))
    print(f"wrote {os.path.join(out, 'results.json')} and report.md")
    return 0


def cmd_generate(args) -> int:
    import json

    from dcwdist.eval.generate import encode_prompt, generate
    from dcwdist.eval.suite import load_run
    from dcwdist.eval.tasks import Prompt

    model, cfg, tok = load_run(args.run_dir, args.overrides)
    with open(args.prompt_file) as f:
        text = f.read()
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        rec = None
    if isinstance(rec, dict) and "document" in rec:
        prompt = Prompt(rec.get("instruction", ""), rec["document"])
    else:
        prompt = Prompt(args.instruction, text)
    cache, head_budget = _cache_args(model, args)
    ids, roles = encode_prompt(tok, prompt)
    align = model.attn_cfg.block_size if model.attn_cfg.block_based else 1
    eos = tok.special_ids["<eos>"]
    gen = generate(model, ids, roles, args.max_new_tokens, cache, align=align,
                   pad_id=tok.pad_id, eos_id=eos, head_budget=head_budget)
    print(tok.decode([t for t in gen.tokens if t != eos]))
    if args.stats:
        import sys
        budgets = None if gen.budgets is None else gen.budgets.tolist()
        print(json.dumps({"prompt_tokens": gen.prompt_len, "new_tokens": len(gen.tokens),
                          "policy": cache.policy, "budgets": budgets,
                          "peak_cache_per_head": gen.peak_sizes.tolist()}), file=sys.stderr)
    return 0


def cmd_tb(args) -> int:
    from dcwdist.eval.positions import format_table
    from dcwdist.train.logging import compare_scalars, last_scalars

    if not args.against:
        print(format_table(last_scalars(args.run_dir)))
        return 0
    rows = compare_scalars(args.run_dir, args.against)
    print(format_table(rows))
    differ = [r["scalar"] for r in rows if r["differ"]]
    print(f"{len(rows) - len(differ)} of {len(rows)} scalars agree at every step both runs logged"
          + (f"; differing: {', '.join(differ)}" if differ else ""))
    return 1 if differ else 0


def cmd_report(args) -> int:
    from dcwdist.eval.report import build_report

    print(build_report(args.run_dirs, args.out, args.title))
    print(f"wrote {args.out}/report.md")
    return 0


def _add_cache_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens per answer")
    p.add_argument("--policy", default="full", choices=("full", "window", "h2o", "tier",
                                                         "learned"),
                   help="KV-cache eviction policy while decoding")
    p.add_argument("--budget", type=int, default=0,
                   help="KV tokens kept per (layer, kv head), or in total with "
                   "--budget-scope total; 0 = unbounded")
    p.add_argument("--budget-scope", default="head", choices=("head", "total"))
    p.add_argument("--recent-ratio", type=float, default=0.5,
                   help="h2o/learned: share of the budget kept for recent tokens")
    p.add_argument("--budget-weights", default=None,
                   help="learned: a torch file holding the [layers, kv heads] budget logits")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcwdist", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("train", help="train from a YAML recipe with dotted overrides",
                       description="Train from a recipe. The resolved config, TensorBoard logs "
                       "(tb/), the model and eval.json land in the run directory "
                       "(logging.run_dir, default runs/NAME).")
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.0.steps=5")
    p.add_argument("--run-dir", default=None, help="output folder (default: logging.run_dir)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a finished run (loss by position, or suites)",
                       description="Without --suite/--ruler: re-run the loss-by-position "
                       "evaluation of RUN_DIR's model at the last stage's length. With them: "
                       "needle / kv heat-maps, QA EM/F1/ROUGE-L and hallucination rate, "
                       "perplexity by position, speed/FLOPs table, RULER jsonl scoring; answers "
                       "are greedy decodes on a KV cache (--policy, --budget). Writes "
                       "results.json + report.md (+ PNGs) to --out. Overrides as for train.")
    p.add_argument("run_dir", help="run directory written by `dcwdist train`")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.eval_rows=8")
    p.add_argument("--suite", default=None,
                   help="comma list of needle,kv,fact,qa,ppl,speed (e.g. --suite needle,kv,qa)")
    p.add_argument("--lengths", default="2k,8k", help="prompt/row lengths, e.g. 512,2k,8k")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=1, help="needle/kv prompts per cell")
    p.add_argument("--qa-samples", type=int, default=8, help="QA examples per length")
    p.add_argument("--seed", type=int, default=0, help="seed of the needle/kv prompts")
    p.add_argument("--ruler", default=None, help="RULER-style jsonl (input, outputs, length)")
    p.add_argument("--ruler-metric", default="all", choices=("all", "part"),
                   help="string_match_all (synthetic tasks) or string_match_part (QA tasks)")
    p.add_argument("--ruler-limit", type=int, default=0, help="first N RULER samples (0: all)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/eval_suite)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cache_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy generation with an evicting KV cache",
                       description="Prefill the prompt with the model's attention kind, then "
                       "decode greedily on a KV cache under an eviction policy. The prompt file "
                       "is plain text (the document; --instruction sets the question) or JSON "
                       "{\"instruction\": ..., \"document\": ...}.")
    p.add_argument("run_dir", help="run directory written by `dcwdist train`")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument("--prompt-file", required=True, help="text or JSON prompt")
    p.add_argument("--instruction", default="", help="instruction for a plain-text prompt")
    p.add_argument("--stats", action="store_true", help="print cache sizes to stderr")
    _add_cache_args(p)
    p.set_defaults(func=cmd_generate, max_new_tokens=32)

    p = sub.add_parser("tb", help="print the last TensorBoard scalars of a run",
                       description="Print the last logged value of every TensorBoard scalar "
                       "in RUN_DIR/tb (loss, lr, tokens/s, MFU, memory, scorer metrics). With "
                       "--against RUN2: compare the two runs step by step (timings left out), "
                       "exit 1 if any scalar differs, e.g. to check that `deterministic: true` "
                       "makes two runs of one seed the same run.")
    p.add_argument("run_dir", help="run directory written by `dcwdist train`")
    p.add_argument("--against", default="", metavar="RUN2",
                   help="another run directory: compare every scalar at every common step")
    p.set_defaults(func=cmd_tb)

    p = sub.add_parser("report", help="compare finished runs: table + plots",
                       description="One table and plots over runs: validation loss by stage, "
                       "retrieval, QA, attention FLOPs vs dense, tokens/s (TensorBoard logs + "
                       "`dcwdist eval` results).")
    p.add_argument("run_dirs", nargs="+", help="run directories written by `dcwdist train`")
    p.add_argument("--out", required=True, help="output folder for report.md and the plots")
    p.add_argument("--title", default="dcwdist report", help="report heading")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("data", help="data tools: synthetic documents, shards, tokenizers",
                       description="Data tools. See `dcwdist data SUBCOMMAND --help`.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    try:
        from dcwdist.data_pipelines.cli import register
        register(data_sub)
    except ImportError:
        pass
    # Subcommands owned by other packages register themselves (submit/status/cancel, hf ...).
    for module in ("dcwdist.launch.cli", "dcwdist.hf.cli"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except ImportError:
            continue
        register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    # Overrides (key=value) may come before or after options such as --run-dir.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"dcwdist: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # non-finite loss or gradients: name step and stage
        print(f"dcwdist: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("dcwdist: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dcwdist tb RUN | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
