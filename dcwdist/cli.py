"""`dcwdist` command line: train, eval, data."""
from __future__ import annotations

import argparse
import sys

from dcwdist.configtree import ConfigError

DESCRIPTION = """dcwdist trains decoder LMs on very long sequences with Dynamic Context Windows
attention. Subcommands:
  train RECIPE [key=value ...]   run a YAML recipe (stages of growing length); dotted overrides
                                 such as attention.window=64 stages.0.steps=5
  eval RUN_DIR                   loss-by-position table of a finished run's model
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


def cmd_tb(args) -> int:
    from dcwdist.eval.positions import format_table
    from dcwdist.train.logging import last_scalars

    print(format_table(last_scalars(args.run_dir)))
    return 0


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

    p = sub.add_parser("eval", help="evaluate a finished run (loss by position)",
                       description="Re-run the loss-by-position evaluation of RUN_DIR's model "
                       "at the last stage's length; overrides as for train.")
    p.add_argument("run_dir", help="run directory written by `dcwdist train`")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.eval_rows=8")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tb", help="print the last TensorBoard scalars of a run",
                       description="Print the last logged value of every TensorBoard scalar "
                       "in RUN_DIR/tb (loss, lr, tokens/s, MFU, memory, scorer metrics).")
    p.add_argument("run_dir", help="run directory written by `dcwdist train`")
    p.set_defaults(func=cmd_tb)

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


if __name__ == "__main__":
    sys.exit(main())
