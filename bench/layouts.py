#!/usr/bin/env python3
"""Step time and expert-parallel traffic of every parallel layout.

Trains the same config for a few steps in each (dp, ep, pp) layout under
mpirun (one process without it for the single-process row), reads the
runs' metrics.jsonl and prints, per layout: the median step time, tokens/s,
and the expert all-to-all bytes per step that motley measured (metrics
field "ep_bytes": bytes every rank sent to other ranks, forward and
backward) next to the analytic volume

    4 * d * bytes_per_element * sum over MoE layers of the routed rows whose
    expert lives on another rank of the sender's EP group,

where the routed rows are counted exactly from the step's "expert_tokens"
assuming every EP rank routes the same share to each expert (a row of
expert e sent by one of the ep ranks is off-rank for the ep - 1 ranks
that do not own e): off-rank rows = sum_e tokens_e * (ep - 1) / ep. The
factor 4: dispatch and return in forward, both again in backward.

    python3 bench/layouts.py --config configs/smoke.json --steps 12
    python3 bench/layouts.py --np 4 --layouts dp2,dp2ep2,dp4ep4,pp2,pp2dp2ep2,pp4

All ranks run on this machine: with more ranks than cores the figures are
oversubscribed (ranks time-share cores) and say nothing about scaling;
they show what each layout costs relative to the others here.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

LAYOUTS = {
    "single": (1, 1, 1),
    "dp2": (2, 1, 1),
    "dp2ep2": (2, 2, 1),
    "dp4": (4, 1, 1),
    "dp4ep2": (4, 2, 1),
    "dp4ep4": (4, 4, 1),
    "pp2": (1, 1, 2),
    "pp2dp2": (2, 1, 2),
    "pp2dp2ep2": (2, 2, 2),
    "pp4": (1, 1, 4),
}


def parse_layout(name):
    if name in LAYOUTS:
        return LAYOUTS[name]
    m = re.fullmatch(r"(?:pp(\d+))?(?:dp(\d+))?(?:ep(\d+))?", name)
    if not m or not any(m.groups()):
        sys.exit(f"layouts.py: cannot read layout '{name}' (e.g. dp2ep2, pp2dp2ep2)")
    pp, dp, ep = (int(g) if g else 1 for g in m.groups())
    return dp, ep, pp


def run_layout(args, name, dp, ep, pp):
    world = dp * pp
    run_dir = os.path.join(args.out, name)
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [f"train.steps={args.steps}", "train.log_every=1", "train.eval_every=0",
            "train.ckpt_every=0", "data.valid=", f"train.micro_batches={args.micro_batches}",
            f"parallel.dp={dp}", f"parallel.ep={ep}", f"parallel.pp={pp}"]
    if args.placement:
        sets.append(f"parallel.placement={args.placement}")
    cmd = [args.motley, "train", "--config", args.config, "--run", run_dir, "--resume", "none"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ)
    if world > 1:
        cmd = [args.mpirun, "--oversubscribe", "--allow-run-as-root", "-np", str(world)] + cmd
    else:
        # One process: give it one BLAS thread like each rank of the others.
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"layouts.py: layout {name} failed (exit {proc.returncode}):\n"
                 + proc.stdout[-3000:])
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row and "tokens_per_s" in row:
                rows.append(row)
    return rows, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smoke.json")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--layouts", default="single,dp2,dp2ep2,dp4,dp4ep4,pp2,pp2dp2ep2,pp4")
    ap.add_argument("--placement", default="", help="parallel.placement for every layout")
    ap.add_argument("--motley", default="build/release/apps/motley")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--out", default="runs/layouts")
    args = ap.parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    model, train = cfg["model"], cfg["train"]
    d = model["d_model"]
    tokens_per_step = train["batch_size"] * train["seq_len"]
    print(f"config {args.config}: d {d}, {model['n_layers']} layers, "
          f"{model.get('moe', {}).get('n_experts', 0)} experts, {tokens_per_step} tokens/step, "
          f"{args.micro_batches} micro-batches per rank; {os.cpu_count()} cores on this machine")
    print(f"{'layout':<11} {'ranks':>5} {'step ms':>9} {'tokens/s':>9} {'loss@last':>10} "
          f"{'EP MB/step':>11} {'analytic':>9} {'ratio':>6}")
    for name in args.layouts.split(","):
        dp, ep, pp = parse_layout(name)
        rows, wall = run_layout(args, name, dp, ep, pp)
        timed = rows[args.warmup:] or rows
        step_ms = statistics.median(1e3 * tokens_per_step / r["tokens_per_s"] for r in timed)
        tok_s = statistics.median(r["tokens_per_s"] for r in timed)
        measured = analytic = None
        if ep > 1:
            measured = statistics.median(r["ep_bytes"] for r in timed) / 1e6
            vals = []
            for r in timed:
                routed = sum(sum(layer) for layer in r["expert_tokens"])
                vals.append(4 * d * 4 * routed * (ep - 1) / ep / 1e6)
            analytic = statistics.median(vals)
        fmt = (lambda v: f"{v:11.2f}") if measured is not None else (lambda v: f"{'-':>11}")
        print(f"{name:<11} {dp * pp:>5} {step_ms:>9.1f} {tok_s:>9.0f} {rows[-1]['loss']:>10.4f} "
              f"{fmt(measured)} "
              + (f"{analytic:>9.2f} {measured / analytic:>6.3f}" if measured is not None
                 else f"{'-':>9} {'-':>6}"),
              flush=True)


if __name__ == "__main__":
    main()
