"""Quality study driver: train + evaluate recipes (several at once on one GPU), then report.

    PYTHONPATH=. python benchmarks/quality.py recipes/ablations/quality_*.yaml \
        --out runs/quality --parallel 4 --budget-s 540

Per recipe: `dcwdist train RECIPE --run-dir OUT/runs/NAME [overrides]`, then `dcwdist eval
OUT/runs/NAME --suite needle,kv,fact,qa,ppl,speed ...` (its results in OUT/runs/NAME/eval_suite),
logs in OUT/runs/NAME.log; up to --parallel jobs share the device (small models leave most of
an H100 idle). A job not started before --budget-s is skipped and listed; a job still running
at --stop-after-s is terminated (its TensorBoard logs keep the stages it finished). --seeds 0,1,2
runs every recipe once per seed as NAME_s<seed>. At the end one JSON line per run (wall seconds,
exit codes) and `dcwdist report` over every run that wrote its config (OUT/report), with a
mean ± std table per recipe when there are several seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_name(recipe: str) -> str:
    return os.path.splitext(os.path.basename(recipe))[0]


def run_name(recipe: str, seed: int | None, tag: str = "") -> str:
    return (job_name(recipe) + ("" if seed is None else f"_s{seed}")
            + (f"_{tag}" if tag else ""))


def eval_missing(args) -> str:
    """The first package the requested eval suites need and cannot import, as an error line."""
    if args.no_eval:
        return ""
    from dcwdist.cli import build_parser
    ev, _ = build_parser().parse_known_args(["eval", "RUN", *args.eval_args.split()])
    if "qa" in (ev.suite or "").split(","):
        from dcwdist.eval.metrics import rouge_l
        try:
            rouge_l("a b", "a b")
        except ImportError as e:
            return f"{e} (the qa eval suite scores ROUGE-L; or pass --no-eval)"
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--parallel", type=int, default=1, help="jobs at once on the device")
    p.add_argument("--budget-s", type=float, default=0, help="start no job after this (0: none)")
    p.add_argument("--override", action="append", default=[], help="dotted override, all runs")
    # the trained lengths; fact scores the training task by depth with answer loss, which
    # separates runs that greedy answers (needle, kv, QA EM: 0 in every trial so far) do not
    p.add_argument("--eval-args", default="--suite needle,kv,fact,qa,ppl,speed "
                   "--lengths 256,2k,8k --samples 2 --qa-samples 16",
                   help="arguments of `dcwdist eval`")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--stop-after-s", type=float, default=0,
                   help="terminate jobs still running after this (0: never)")
    p.add_argument("--seeds", default="", help="comma list: each recipe once per seed "
                   "(run NAME_s<seed>, override seed=<seed>); default: the recipe's seed")
    p.add_argument("--tag", default="", help="appended to every run name (NAME[_sSEED]_TAG): "
                   "tells apart drivers run side by side, e.g. one per shared start")
    args = p.parse_args(argv)
    missing = eval_missing(args)
    if missing:  # before any training: a run that trains for minutes and then cannot evaluate
        print(f"quality.py: {missing}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs_dir = os.path.join(args.out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    py = [sys.executable, "-m", "dcwdist.cli"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # jobs: (recipe, seed or None); seeds interleave so a cut budget drops whole seeds last
    pending = ([(r, s) for s in seeds for r in args.recipes] if seeds
               else [(r, None) for r in args.recipes])
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    done, skipped = [], []
    t0 = time.perf_counter()

    def start(job):
        recipe, seed = job
        name = run_name(recipe, seed, args.tag)
        run_dir = os.path.join(runs_dir, name)
        extra = [] if seed is None else [f"seed={seed}"]
        train = py + ["train", recipe, *args.override, *extra, "--run-dir", run_dir]
        cmd = " ".join(train)
        if not args.no_eval:
            ev = py + ["eval", run_dir, *args.eval_args.split(), "--no-progress"]
            cmd += " && " + " ".join(ev)
        log = open(os.path.join(runs_dir, name + ".log"), "w")
        log.write(f"$ {cmd}\n")
        log.flush()
        # own process group: --stop-after-s stops the shell and the train / eval under it
        proc = subprocess.Popen(cmd, shell=True, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO, start_new_session=True)
        running[name] = (proc, time.perf_counter(), log)
        print(f"[{time.perf_counter() - t0:6.0f}s] start {name}", flush=True)

    while pending or running:
        while pending and len(running) < args.parallel:
            if (args.budget_s and time.perf_counter() - t0 > args.budget_s) or (
                    args.stop_after_s and time.perf_counter() - t0 > args.stop_after_s):
                skipped += [run_name(r, s, args.tag) for r, s in pending]
                pending.clear()
                break
            start(pending.pop(0))
        late = args.stop_after_s and time.perf_counter() - t0 > args.stop_after_s
        for name, (proc, ts, log) in list(running.items()):
            if late and proc.poll() is None:
                print(f"[{time.perf_counter() - t0:6.0f}s] stop {name} (--stop-after-s)",
                      flush=True)
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
            if proc.poll() is not None:
                log.close()
                row = {"run": name, "rc": proc.returncode,
                       "wall_s": round(time.perf_counter() - ts, 1)}
                print(json.dumps(row), flush=True)
                done.append(row)
                del running[name]
        time.sleep(1.0)
    if skipped:
        print(json.dumps({"skipped_for_budget": skipped}), flush=True)
    ok = [os.path.join(runs_dir, r["run"]) for r in done
          if os.path.exists(os.path.join(runs_dir, r["run"], "config.yaml"))]
    if ok:
        from dcwdist.eval.report import build_report
        build_report(ok, os.path.join(args.out, "report"), "Quality study")
        print(f"report: {os.path.join(args.out, 'report', 'report.md')}", flush=True)
    return 0 if all(r["rc"] == 0 for r in done) else 1


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
