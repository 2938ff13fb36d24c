#!/usr/bin/python3
"""Runs a grid of motley trainings and tabulates them.

    bench/experiments.py bench/grids/papers.json [--motley PATH] [--only V1,V2]
                         [--seeds 1,2] [--dry-run] [--report-only] [--no-route]

A grid file (JSON) names variants, each a base config plus --set overrides,
and the seeds to run:

    {"name": "papers", "seeds": [1, 2],
     "set": {"train.steps": 300},                 # applied to every variant
     "route": {"every_checkpoint": true, "windows": 200},   # optional
     "variants": [
        {"name": "baseline", "config": "configs/smoke.json", "group": "MoDSE",
         "set": {"model.moe.expert_sizes": "uniform"}, "note": "..."}, ...]}

For every (variant, seed) it trains into runs/experiments/<grid>/<variant>/
seed<k> (`--resume auto`: an interrupted run continues), evaluates the final
checkpoint with `motley eval`, optionally writes per-token routing files with
`motley route` (route/step_<n>.h5, for bench/analyze.py), and stores
result.json. A run whose result.json matches its settings is skipped, so the
script is idempotent and resumable: run it again after an interruption.

Writes runs/experiments/<grid>/results.{md,csv}, eval_bpb.png and
curves.png. Run it from the repository root (config and data paths are
relative to it).
"""
import argparse
import csv
import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*args):
    print("[experiments]", *args, flush=True)


def default_motley():
    for cand in ("build/h-exp/apps/motley", "build/release/apps/motley"):
        p = os.path.join(ROOT, cand)
        if os.path.exists(p):
            return p
    return shutil.which("motley") or "motley"


def read_jsonl(path):
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def set_args(overrides):
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    return out


def variant_overrides(grid, variant, seed, out_root=None):
    s = dict(grid.get("set", {}))
    s.update(variant.get("set", {}))
    s["train.seed"] = seed
    src = variant.get("widen_to_mean_active_of")
    if src:
        # MoDSE's control: uniform experts whose size is the measured mean
        # activated expert size of another variant (its first seed's run).
        p = os.path.join(out_root, src, f"seed{grid['seeds'][0]}", "result.json")
        if not os.path.exists(p):
            raise RuntimeError(f"{variant['name']} needs {src} seed {grid['seeds'][0]} first")
        h = json.load(open(p))["mean_active_expert_hidden"]
        mult = 8
        s["model.moe.expert_sizes"] = "uniform"
        s["model.moe.expert_hidden"] = int(round(h / mult)) * mult
    return s


def signature(variant, overrides):
    blob = json.dumps({"config": variant["config"], "set": overrides}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


# ---- parameter counts from a resolved config (motley's Transformer) ------------


def expert_sizes(moe):
    e, h, mult = moe["n_experts"], moe["expert_hidden"], moe.get("size_multiple", 8)
    kind = moe["expert_sizes"]
    if isinstance(kind, list):
        return list(kind)
    if kind == "uniform":
        return [h] * e
    if kind == "modse":
        pairs = e // 2
        fr = []
        if e == 8:
            bigs = [1.8, 1.6, 1.2, 1.0]
        else:
            bigs = [1.8 - 0.8 * i / max(1, pairs - 1) for i in range(pairs)] if pairs > 1 else [1.8]
        for b in bigs:
            fr += [b, 2.0 - b]
        raw = [f * h for f in fr]
    elif kind == "arithmetic":
        rel = [9 + 2 * i for i in range(e)]
        raw = [r * e * h / sum(rel) for r in rel]
    else:
        raise ValueError(kind)
    # largest remainder rounding to multiples of mult, total e*h
    units = [r / mult for r in raw]
    base = [max(1, int(math.floor(u))) for u in units]
    left = e * h // mult - sum(base)
    order = sorted(range(e), key=lambda i: (-(units[i] - math.floor(units[i])), i))
    for i in order[:max(0, left)]:
        base[i] += 1
    return [b * mult for b in base]


def param_counts(cfg):
    """(total, non_expert_active, expert_total): non_expert_active excludes the
    embedding lookup (as `motley inspect`)."""
    m = cfg["model"]
    moe = m["moe"]
    d, v, L = m["d_model"], m["vocab_size"], m["n_layers"]
    e = moe["n_experts"]
    every, first_dense = moe.get("every", 1), moe.get("first_dense", 0)
    embed = v * d
    non_expert = v * d + d  # lm_head, final norm
    experts = 0
    gru = False
    sizes = expert_sizes(moe) if e > 0 else []
    for l in range(L):
        non_expert += 4 * d * d + 2 * d
        is_moe = e > 0 and l >= first_dense and l % every == every - 1
        if not is_moe:
            non_expert += 3 * d * m["ffn_hidden"]
            continue
        experts += sum(3 * d * s for s in sizes)
        if moe["router"] == "gru":
            p = moe["gru_dim"]
            non_expert += p * d + e * p
            gru = True
        else:
            non_expert += (2 if moe["router"] == "noisy" else 1) * e * d
    if gru:
        p = moe["gru_dim"]
        non_expert += 2 * 3 * p * p + 2 * 3 * p
    return embed + non_expert + experts, non_expert, experts, sizes


# ---- one run ---------------------------------------------------------------------


def run_cmd(cmd, logfile):
    with open(logfile, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        t0 = time.time()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    return rc, time.time() - t0


def checkpoints(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step_*.h5")))


def summarise(run_dir, cfg, eval_out, wall_s):
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    total, non_expert, experts, sizes = param_counts(cfg)
    n_steps = cfg["train"]["steps"]
    tail = [r for r in steps if r["step"] > 0.9 * n_steps] or steps[-1:]
    act_layers = None
    if tail and tail[-1].get("active_params_per_token"):
        n_layers = len(tail[-1]["active_params_per_token"])
        act_layers = [sum(r["active_params_per_token"][i] for r in tail) / len(tail)
                      for i in range(n_layers)]
    tok_s = [r["tokens_per_s"] for r in steps[1:]] or [r["tokens_per_s"] for r in steps]
    res = {
        "eval_loss": eval_out.get("eval_loss"),
        "eval_ppl": eval_out.get("eval_ppl"),
        "eval_bpb": eval_out.get("eval_bpb"),
        "final_train_lm_loss": steps[-1]["lm_loss"] if steps else None,
        "total_params": total,
        "non_expert_active_params": non_expert,
        "expert_params": experts,
        "expert_sizes": sizes,
        "expert_active_per_layer": act_layers,
        "expert_active_mean_layer": (sum(act_layers) / len(act_layers)) if act_layers else 0.0,
        "active_params_per_token": non_expert + (sum(act_layers) if act_layers else 0.0),
        "tokens_per_s": sum(tok_s) / len(tok_s) if tok_s else None,
        "wall_s": wall_s,
        "evals": [{"step": r["step"], "eval_bpb": r.get("eval_bpb"), "eval_loss": r["eval_loss"]}
                  for r in evals],
        "tokens": n_steps * cfg["train"]["batch_size"] * cfg["train"]["seq_len"],
    }
    # mean activated expert size (hidden units per selected expert) at the end
    if tail and tail[-1].get("expert_tokens"):
        d = cfg["model"]["d_model"]
        num = den = 0.0
        for r in tail:
            for counts in r["expert_tokens"]:
                num += sum(c * s for c, s in zip(counts, sizes))
                den += sum(counts)
        res["mean_active_expert_hidden"] = num / den if den else None
        res["experts_per_token"] = (sum(act_layers) / len(act_layers)) / (
            3 * d * res["mean_active_expert_hidden"]) if den and act_layers else None
    return res


def parse_eval(text):
    out = {}
    for key in ("eval_loss", "eval_ppl", "eval_bpb"):
        m = re.search(rf"^{key} ([0-9.eE+-]+)\s*$", text, re.M)
        if m:
            out[key] = float(m.group(1))
    return out


def prune_intermediate(grid, run_dir):
    """With the grid's "keep_only_final": true, deletes every checkpoint but
    the last once a run is finished (and routed): each holds the optimizer
    state too."""
    if not grid.get("keep_only_final"):
        return
    for ck in checkpoints(run_dir)[:-1]:
        os.remove(ck)


def do_run(args, grid, variant, seed, out_root):
    try:
        overrides = variant_overrides(grid, variant, seed, out_root)
    except RuntimeError as e:
        log(f"skip {variant['name']} seed {seed}: {e}")
        return None
    sig = signature(variant, overrides)
    run_dir = os.path.join(out_root, variant["name"], f"seed{seed}")
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            old = json.load(f)
        want_route = grid.get("route") and seed in grid["route"].get("seeds", [seed])
        if old.get("signature") == sig and (args.no_route or old.get("routed") or not want_route):
            log(f"skip {variant['name']} seed {seed} (done)")
            if not args.dry_run:
                prune_intermediate(grid, run_dir)
            return old
        if old.get("signature") != sig:
            log(f"{variant['name']} seed {seed}: settings changed, starting over")
            shutil.rmtree(run_dir)
    cmd = [args.motley, "train", "--config", variant["config"], "--run", os.path.relpath(run_dir, ROOT),
           "--resume", "auto"] + set_args(overrides)
    if args.dry_run:
        print(" ".join(cmd))
        return None
    os.makedirs(run_dir, exist_ok=True)
    sig_path = os.path.join(run_dir, "signature")
    if os.path.exists(sig_path) and open(sig_path).read().strip() != sig:
        log(f"{variant['name']} seed {seed}: settings changed, starting over")
        shutil.rmtree(run_dir)
        os.makedirs(run_dir)
    with open(sig_path, "w") as f:
        f.write(sig + "\n")
    logfile = os.path.join(run_dir, "run.log")
    wall_path = os.path.join(run_dir, "wall_s.json")
    wall = json.load(open(wall_path)) if os.path.exists(wall_path) else {"train": 0.0}

    done_marker = os.path.join(run_dir, "train.done")
    if not os.path.exists(done_marker):
        log(f"train {variant['name']} seed {seed}")
        rc, dt = run_cmd(cmd, logfile)
        wall["train"] += dt
        json.dump(wall, open(wall_path, "w"))
        if rc != 0:
            log(f"train failed (exit {rc}); see {logfile}")
            return None
        open(done_marker, "w").close()
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)

    # The final eval row of metrics.jsonl is the same computation as
    # `motley eval` on the final checkpoint (same windows, eval mode); the
    # grid's "reeval": true runs `motley eval` anyway and checks they agree.
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    final = [r for r in rows if "eval_loss" in r and r["step"] == cfg["train"]["steps"]]
    eval_out = {k: final[-1].get(k) for k in ("eval_loss", "eval_ppl", "eval_bpb")} if final else {}
    if grid.get("reeval") or not final or args.reeval:
        ev = subprocess.run([args.motley, "eval", "--checkpoint", run_dir], cwd=ROOT,
                            capture_output=True, text=True)
        with open(logfile, "a") as f:
            f.write(ev.stdout + ev.stderr)
        if ev.returncode != 0:
            log(f"eval failed (exit {ev.returncode}); see {logfile}")
            return None
        fresh = parse_eval(ev.stdout)
        if eval_out and abs(fresh["eval_loss"] - eval_out["eval_loss"]) > 1e-4:
            log(f"warning: motley eval {fresh['eval_loss']} != training's final eval "
                f"{eval_out['eval_loss']}")
        eval_out = fresh
    res = summarise(run_dir, cfg, eval_out, wall["train"])
    res.update({"variant": variant["name"], "seed": seed, "signature": sig,
                "group": variant.get("group", ""), "config": variant["config"],
                "set": variant.get("set", {}), "routed": False})

    route = grid.get("route")
    if route and seed not in route.get("seeds", [seed]):
        route = None
    if route and not args.no_route:
        route_dir = os.path.join(run_dir, "route")
        os.makedirs(route_dir, exist_ok=True)
        ckpts = checkpoints(run_dir)
        if not route.get("every_checkpoint", True):
            ckpts = ckpts[-1:]
        for i, ck in enumerate(ckpts):
            step = int(re.search(r"step_(\d+)", ck).group(1))
            out = os.path.join(route_dir, f"step_{step}.h5")
            if os.path.exists(out):
                continue
            final = i == len(ckpts) - 1
            cmd = [args.motley, "route", "--checkpoint", ck, "--out", out]
            if route.get("windows") and not final:
                cmd += ["--windows", str(route["windows"])]
            if not final:
                cmd.append("--no-probs")
            rc, _ = run_cmd(cmd, logfile)
            if rc != 0:
                log(f"route failed on {ck} (exit {rc}); see {logfile}")
                return None
        res["routed"] = True
    with open(result_path, "w") as f:
        json.dump(res, f, indent=1)
    prune_intermediate(grid, run_dir)
    log(f"done {variant['name']} seed {seed}: eval_bpb {res['eval_bpb']}, "
        f"train {res['wall_s']:.0f} s")
    return res


# ---- table and plots ---------------------------------------------------------------


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def fmt_count(x):
    if x is None:
        return "-"
    return f"{x / 1e6:.3f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


def write_report(grid, results, out_root):
    names = [v["name"] for v in grid["variants"]]
    by = {n: [r for r in results if r and r["variant"] == n] for n in names}
    rows = []
    for v in grid["variants"]:
        rs = by[v["name"]]
        if not rs:
            continue
        bpb_m, bpb_s = mean_std([r["eval_bpb"] for r in rs])
        loss_m, loss_s = mean_std([r["eval_loss"] for r in rs])
        bpbs = [r["eval_bpb"] for r in rs if r["eval_bpb"] is not None]
        rows.append({
            "group": v.get("group", ""),
            "variant": v["name"],
            "seeds": len(rs),
            "eval_bpb_mean": bpb_m,
            "eval_bpb_std": bpb_s,
            "eval_bpb_min": min(bpbs) if bpbs else None,
            "eval_bpb_max": max(bpbs) if bpbs else None,
            "eval_loss_mean": loss_m,
            "eval_loss_std": loss_s,
            "total_params": rs[0]["total_params"],
            "active_params_per_token": mean_std([r["active_params_per_token"] for r in rs])[0],
            "expert_active_per_moe_layer": mean_std([r["expert_active_mean_layer"] for r in rs])[0],
            "mean_active_expert_hidden": mean_std([r.get("mean_active_expert_hidden") for r in rs])[0],
            "tokens_per_s": mean_std([r["tokens_per_s"] for r in rs])[0],
            "wall_s": mean_std([r["wall_s"] for r in rs])[0],
            "tokens": rs[0]["tokens"],
        })
    csv_path = os.path.join(out_root, "results.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["variant"])
        w.writeheader()
        for r in rows:
            w.writerow(r)
    lines = [
        "| group | variant | seeds | eval bpb (mean ± std) | bpb min / max | eval loss | total params "
        "| activated / token | expert act. / MoE layer | mean act. expert h | tokens/s | train wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def f4(x):
            return "-" if x is None else f"{x:.4f}"

        def f0(x):
            return "-" if x is None else f"{x:.0f}"
        lines.append(
            f"| {r['group']} | {r['variant']} | {r['seeds']} | {f4(r['eval_bpb_mean'])} ± "
            f"{f4(r['eval_bpb_std'])} | {f4(r['eval_bpb_min'])} / {f4(r['eval_bpb_max'])} | "
            f"{f4(r['eval_loss_mean'])} | {fmt_count(r['total_params'])} | "
            f"{fmt_count(r['active_params_per_token'])} | {fmt_count(r['expert_active_per_moe_layer'])} | "
            f"{f0(r['mean_active_expert_hidden'])} | {f0(r['tokens_per_s'])} | "
            f"{r['wall_s']:.0f} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_root, "results.md"), "w") as f:
        f.write(f"# Grid `{grid['name']}`\n\n")
        if grid.get("description"):
            f.write(grid["description"] + "\n\n")
        f.write(md)
        f.write("\nactivated / token: non-expert parameters (without the embedding lookup) plus the "
                "expert parameters each token used, summed over MoE layers, averaged over the "
                "last 10% of training steps (metrics.jsonl). bpb spread: sample std over seeds.\n")
    log(f"wrote {csv_path} and results.md")
    plot(grid, rows, by, out_root)
    return md


def plot(grid, rows, by, out_root):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        log("matplotlib missing: no plots")
        return
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows) + 2), 4.5))
    xs = range(len(rows))
    groups = sorted({r["group"] for r in rows})
    colors = {g: f"C{i}" for i, g in enumerate(groups)}
    for i, r in enumerate(rows):
        seeds = [x["eval_bpb"] for x in by[r["variant"]] if x["eval_bpb"] is not None]
        ax.errorbar([i], [r["eval_bpb_mean"]], yerr=[[r["eval_bpb_mean"] - r["eval_bpb_min"]],
                                                     [r["eval_bpb_max"] - r["eval_bpb_mean"]]],
                    fmt="o", color=colors[r["group"]], capsize=4,
                    label=r["group"] if r["group"] not in ax.get_legend_handles_labels()[1] else None)
        ax.scatter([i] * len(seeds), seeds, s=10, color="k", alpha=0.4, zorder=3)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["variant"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("eval bits per byte (mean, min-max bars, dots: seeds)")
    ax.set_title(f"grid {grid['name']}: eval bpb per variant")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_root, "eval_bpb.png"), dpi=110)
    plt.close(fig)

    # training curves: train lm_loss per group, and its difference to the
    # group's reference (same seed: the same batches, so the difference is
    # far less noisy than either curve)
    group_names = [g for g in dict.fromkeys(r["group"] for r in rows)]
    extra = grid.get("analysis", {}).get("group_extra", {})

    def curve(variant, seed):
        met = read_jsonl(os.path.join(out_root, variant, f"seed{seed}", "metrics.jsonl"))
        return {m["step"]: m["lm_loss"] for m in met if "lm_loss" in m}

    fig, axes = plt.subplots(2, len(group_names), figsize=(4.5 * len(group_names), 7), squeeze=False)
    for j, g in enumerate(group_names):
        members = [r for r in rows if r["variant"] in extra.get(g, [])] + \
            [r for r in rows if r["group"] == g]
        ref = members[0]["variant"]
        for k, r in enumerate(members):
            diffs = []
            for s, res in enumerate(by[r["variant"]]):
                c = curve(r["variant"], res["seed"])
                steps = sorted(c)
                kw = dict(color=f"C{k}", alpha=0.8, lw=1, label=r["variant"] if s == 0 else None,
                          ls=":" if r["group"] != g else "-")
                axes[0][j].plot(steps, [c[t] for t in steps], **kw)
                cr = curve(ref, res["seed"])
                common = [t for t in steps if t in cr]
                if common:
                    diffs.append((common, np.array([c[t] - cr[t] for t in common])))
            if diffs and r["variant"] != ref:
                n = min(len(d[0]) for d in diffs)
                mean = np.mean([d[1][:n] for d in diffs], axis=0)
                axes[1][j].plot(diffs[0][0][:n], mean, color=f"C{k}", lw=1.2, marker="o", ms=2,
                                label=f"{r['variant']} ({len(diffs)} seeds)")
        axes[1][j].axhline(0, color="k", lw=0.8)
        axes[0][j].set_title(g)
        axes[0][j].set_ylabel("train lm_loss (nats)")
        axes[1][j].set_ylabel(f"lm_loss - {ref} lm_loss (same seed)")
        axes[1][j].set_xlabel("step")
        for a in axes[:, j]:
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
        ys = [y for line in axes[0][j].get_lines() for y in line.get_ydata()[len(line.get_ydata()) // 4:]]
        if ys:
            axes[0][j].set_ylim(min(ys) - 0.1, max(ys) + 0.2)
        ys = [y for line in axes[1][j].get_lines()[:-1] for y in line.get_ydata()[len(line.get_ydata()) // 4:]]
        if ys:
            pad = 0.1 * (max(ys) - min(ys) + 1e-3)
            axes[1][j].set_ylim(min(min(ys), 0) - pad, max(max(ys), 0) + pad)
    fig.tight_layout()
    fig.savefig(os.path.join(out_root, "curves.png"), dpi=100)
    plt.close(fig)
    log("wrote eval_bpb.png and curves.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("grid", help="grid JSON file")
    ap.add_argument("--motley", default=None, help="the motley binary (default: build/h-exp or build/release)")
    ap.add_argument("--out", default=None, help="output root (default: runs/experiments/<grid>)")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the grid's)")
    ap.add_argument("--dry-run", action="store_true", help="print the train commands only")
    ap.add_argument("--report-only", action="store_true", help="tabulate finished runs, train nothing")
    ap.add_argument("--no-route", action="store_true", help="skip motley route")
    ap.add_argument("--reeval", action="store_true",
                    help="always run motley eval (default: only when the grid says so or "
                         "metrics.jsonl lacks the final eval)")
    args = ap.parse_args()
    args.motley = os.path.abspath(args.motley) if args.motley else default_motley()
    with open(args.grid) as f:
        grid = json.load(f)
    out_root = args.out or os.path.join(ROOT, "runs", "experiments", grid["name"])
    os.makedirs(out_root, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else grid["seeds"]
    variants = grid["variants"]
    if args.only:
        keep = set(args.only.split(","))
        variants = [v for v in variants if v["name"] in keep]
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    results = []
    failed = 0
    # seed-major order: a partial grid has every variant at the first seed
    for seed in seeds:
        for v in variants:
            if args.report_only:
                p = os.path.join(out_root, v["name"], f"seed{seed}", "result.json")
                res = json.load(open(p)) if os.path.exists(p) else None
            else:
                res = do_run(args, grid, v, seed, out_root)
                failed += res is None and not args.dry_run
            if res:
                results.append(res)
    if args.dry_run:
        return 0
    # the table covers every finished run of the grid, not only this invocation's
    results = []
    for seed in grid["seeds"]:
        for v in grid["variants"]:
            p = os.path.join(out_root, v["name"], f"seed{seed}", "result.json")
            if os.path.exists(p):
                results.append(json.load(open(p)))
    print(write_report(grid, results, out_root))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
