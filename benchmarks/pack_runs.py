"""Pack quality-study run directories into a few tar files small enough to bring back from a
device call (which returns at most 8 files of 16 MiB each).

    python benchmarks/pack_runs.py /tmp/q/runs [/tmp/rep/runs ...] --dest $OUT [--report /tmp/q/report]

`logs.tar` holds every run's config, summary, eval JSON, TensorBoard events and driver log (and
the report folder); `weights_N.tar` hold the weights, a few runs each: model.pt of a finished run,
else the newest checkpoint cut down to its model (`checkpoints/TAG/state.pt` holding only
"model", which `benchmarks/length_transfer.py --checkpoint TAG` reads), so a run stopped by
--stop-after-s still comes back. Unpack all of them into one folder: `for t in *.tar; do tar xf
$t -C RUNS; done`.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile

import torch

SMALL = ("config.yaml", "summary.json", "eval.json", "last_step")


def run_dirs(roots: list[str]) -> list[tuple[str, str]]:
    """(run directory, name in the tars); a name met again (the same recipe and seed run twice,
    from another root) gets _rep2, _rep3, ..."""
    out, seen = [], {}
    for root in roots:
        for d in sorted(os.listdir(root)):
            if os.path.exists(os.path.join(root, d, "config.yaml")):
                seen[d] = seen.get(d, 0) + 1
                out.append((os.path.join(root, d), d if seen[d] == 1 else f"{d}_rep{seen[d]}"))
    return out


def weights(run: str) -> tuple[str, bytes] | None:
    """(path inside the run, bytes) of the run's weights, or None when it saved none."""
    path = os.path.join(run, "model.pt")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return "model.pt", f.read()
    from dcwdist.train.checkpoint import CheckpointConfig, CheckpointManager, check_complete
    from length_transfer import load_weights

    folder = os.path.join(run, "checkpoints")
    tags = [t for t in CheckpointManager(CheckpointConfig(), folder, 0).tags()
            if check_complete(os.path.join(folder, t)) is None]
    if not tags:
        return None
    buf = io.BytesIO()
    torch.save({"model": load_weights(run, tags[0])}, buf)
    return f"checkpoints/{tags[0]}/state.pt", buf.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", help="folders of run directories (quality.py's OUT/runs)")
    p.add_argument("--dest", required=True)
    p.add_argument("--report", default="", help="a report folder to add to logs.tar")
    p.add_argument("--max-mib", type=float, default=15.0, help="largest weights tar")
    args = p.parse_args(argv)
    os.makedirs(args.dest, exist_ok=True)
    runs = run_dirs(args.roots)
    with tarfile.open(os.path.join(args.dest, "logs.tar"), "w") as tar:
        for run, name in runs:
            for f in SMALL:
                if os.path.exists(os.path.join(run, f)):
                    tar.add(os.path.join(run, f), f"{name}/{f}")
            if os.path.isdir(os.path.join(run, "tb")):
                tar.add(os.path.join(run, "tb"), f"{name}/tb")
            if os.path.exists(run + ".log"):
                tar.add(run + ".log", f"{name}.log")
        if args.report and os.path.isdir(args.report):
            tar.add(args.report, "report")
    packs: list[list[tuple[str, bytes]]] = [[]]
    for run, name in runs:
        w = weights(run)
        if w is None:
            print(f"pack_runs: {run} saved no weights", file=sys.stderr)
            continue
        item = (f"{name}/{w[0]}", w[1])
        if packs[-1] and sum(len(b) for _, b in packs[-1]) + len(item[1]) > args.max_mib * 2**20:
            packs.append([])
        packs[-1].append(item)
    for i, pack in enumerate(p for p in packs if p):
        with tarfile.open(os.path.join(args.dest, f"weights_{i}.tar"), "w") as tar:
            for name, data in pack:
                add_bytes(tar, name, data)
        print(f"weights_{i}.tar: {', '.join(n.split('/')[0] for n, _ in pack)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
