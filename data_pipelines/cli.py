"""`dcwdist data ...` commands: synth, prepare, tokenizer train.

The main CLI calls `register(data_subparsers)`; `python -m dcwdist.data_pipelines.cli SUBCOMMAND`
runs the same commands on their own.
"""
from __future__ import annotations

import argparse
import sys

SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size(text: str) -> int:
    """'2k' -> 2048, '1m' -> 1048576, '300' -> 300 (binary suffixes, as sequence lengths are)."""
    t = text.strip().lower()
    try:
        if t and t[-1] in SUFFIX:
            return int(float(t[:-1]) * SUFFIX[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 2k, 1m)") from None


def cmd_synth(args) -> int:
    from dcwdist.data_pipelines.synthetic import write_synthetic
    n = write_synthetic(args.out, args.n, args.min_len, args.max_len, args.seed,
                        num_facts=args.num_facts, specificity=args.specificity,
                        style=args.style, hops=args.hops)
    print(f"wrote {n} examples to {args.out}")
    return 0


def cmd_prepare(args) -> int:
    from dcwdist.data_pipelines.shards import prepare_shards
    index = prepare_shards(args.input, args.output, args.tokenizer, args.seq_len, fmt=args.format,
                           shard_tokens=args.shard_tokens, progress=not args.quiet)
    print(f"wrote {index['num_docs']} documents, {index['num_tokens']} tokens, "
          f"{len(index['shards'])} shard(s) to {args.output} ({index['num_rows']} rows of "
          f"{args.seq_len}; {index['docs_longer_than_seq_len']} documents longer than a row)")
    return 0


def cmd_tokenizer_train(args) -> int:
    from dcwdist.data_pipelines.loaders import iter_source
    from dcwdist.data_pipelines.tokenizer import train_bpe

    def texts():
        for item in iter_source(args.input, args.format):
            if isinstance(item, str):
                yield item
            else:
                yield from (item.instruction, item.document, item.answer)
    tok = train_bpe(texts(), args.vocab_size, args.min_frequency, out_path=args.output)
    print(f"wrote a BPE tokenizer with {tok.vocab_size} tokens to {args.output}")
    return 0


def _guarded(func):
    """Data problems end the command with one line on stderr and status 2."""
    def run(args) -> int:
        from dcwdist.data_pipelines.sources import DataError
        try:
            return func(args)
        except (DataError, FileNotFoundError, ValueError) as e:
            print(f"dcwdist data: error: {e}", file=sys.stderr)
            return 2
    return run


def register(sub) -> None:
    """Add synth / prepare / tokenizer to the `dcwdist data` subparsers `sub`."""
    from dcwdist.data_pipelines.loaders import FORMATS
    fmt_help = f"how INPUT is laid out: {', '.join(FORMATS)} (default: records)"

    p = sub.add_parser(
        "synth", help="write synthetic DCW examples (jsonl)",
        description="Write synthetic long documents with embedded key sections (fact sentences, "
        "clauses, value tables), an instruction, its answer, relevance spans and the supported "
        "facts, one JSON object per line. Sizes accept k/m suffixes (2k = 2048).")
    p.add_argument("out", help="output .jsonl file")
    p.add_argument("--n", type=int, default=1000, help="number of examples (default 1000)")
    p.add_argument("--min-len", type=size, default=size("2k"), help="shortest document (2k)")
    p.add_argument("--max-len", type=size, default=size("32k"), help="longest document (32k)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--num-facts", type=int, default=4, help="key facts per document (4)")
    p.add_argument("--specificity", default="mixed",
                   choices=["mixed", "specific", "keyed", "vague"],
                   help="how precisely instructions name their section (default mixed)")
    p.add_argument("--style", default="rich", choices=["basic", "rich"],
                   help="rich: clauses, tables and filler genres (default); basic: facts only")
    p.add_argument("--hops", type=int, default=0, choices=[0, 1, 2, 3, 4],
                   help="cross-reference hops per question; 0 mixes 1 and 2 (default)")
    p.set_defaults(func=_guarded(cmd_synth))

    p = sub.add_parser(
        "prepare", help="tokenize local data into memmap shards",
        description="Tokenize a local file or folder (json/jsonl/parquet/txt/tsv, read offline "
        "through `datasets`) into memmap shards plus index.json, for data.source=memmap.")
    p.add_argument("input", help="local file or folder (hub names are not fetched)")
    p.add_argument("output", help="shard folder to write (replaced if it exists)")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json (byte)")
    p.add_argument("--seq-len", type=size, default=size("4k"),
                   help="row length to report row counts for; documents are stored whole (4k)")
    p.add_argument("--format", default="records", choices=sorted(FORMATS), help=fmt_help)
    p.add_argument("--shard-tokens", type=size, default=size("64m"),
                   help="tokens per shard before a new one starts (64m)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_guarded(cmd_prepare))

    p = sub.add_parser("tokenizer", help="tokenizer tools",
                       description="Tokenizer tools. See `tokenizer train --help`.")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    p = tsub.add_parser(
        "train", help="train a byte-level BPE with the DCW special tokens",
        description="Train a byte-level BPE (special tokens <pad> <bos> <eos> <instr> <doc> "
        "<answer> first) on local data and save it as tokenizer.json; use it with "
        "data.tokenizer=PATH or --tokenizer PATH.")
    p.add_argument("input", help="local file or folder of training text")
    p.add_argument("output", help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=size, default=8192, help="vocabulary size (8192)")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count (2)")
    p.add_argument("--format", default="records", choices=sorted(FORMATS), help=fmt_help)
    p.set_defaults(func=_guarded(cmd_tokenizer_train))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcwdist.data_pipelines.cli",
                                     description="dcwdist data tools")
    register(parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
