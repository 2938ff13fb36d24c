#!/usr/bin/python3
"""Analyses of a grid run by bench/experiments.py.

    bench/analyze.py bench/grids/papers.json [--out DIR] [--seed 1]
                     [--reference baseline] [--copy-to docs/figures/papers]

Reads runs/experiments/<grid>/<variant>/seed<k>/{metrics.jsonl, route/*.h5}
(route files come from `motley route`, which experiments.py runs on every
kept checkpoint when the grid has a "route" entry) and writes, under
runs/experiments/<grid>/analysis/ (or --out), a markdown table and a PNG for:

  difficult   MoDSE's difficult tokens: per-token CE of each variant against
              the reference on the valid split, bucketed by the reference's
              CE; mean change and count per bucket; the size of the top-1
              expert those tokens choose.
  load        load over training from metrics.jsonl: max/min tokens-per-expert
              ratio per layer; activated expert parameters per token over
              training and by layer.
  stability   routing stability: share of tokens whose top-1 expert changes
              between consecutive checkpoints.
  rmoe        gate entropy per token and mutual information of the top-1
              expert between consecutive MoE layers.

Everything is per seed (--seed, default the grid's first); the route files
exist only for the seeds listed in the grid's "route" entry.
"""
import argparse
import glob
import json
import os
import re
import shutil
import sys

import h5py
import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    return rows


def route_files(run_dir):
    files = glob.glob(os.path.join(run_dir, "route", "step_*.h5"))
    return sorted(files, key=lambda p: int(re.search(r"step_(\d+)", p).group(1)))


def load_route(path, probs=False):
    with h5py.File(path, "r") as f:
        out = {"ce": f["ce"][:], "targets": f["targets"][:], "bytes": f["bytes"][:],
               "step": int(f.attrs["step"]), "layers": {}}
        out["expert_sizes"] = np.array(f.attrs["expert_sizes"]) if "expert_sizes" in f.attrs else None
        out["d_model"] = int(f.attrs["d_model"])
        for name in sorted(f["layers"].keys(), key=int):
            g = f["layers"][name]
            ld = {"top1": g["top1"][:], "selected": g["selected"][:], "entropy": g["entropy"][:]}
            if probs and "probs" in g:
                ld["probs"] = g["probs"][:]
            out["layers"][int(name)] = ld
    return out


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(str(x) for x in r) + " |")
    return "\n".join(lines) + "\n"


def write_md(path, title, text):
    with open(path, "w") as f:
        f.write(f"## {title}\n\n{text}")
    print(f"[analyze] wrote {path}")


# ---- (a) difficult tokens --------------------------------------------------------

BUCKETS = [(0, 2), (2, 4), (4, 6), (6, 8), (8, float("inf"))]


def analyze_difficult(grid, runs, reference, out, shape_of):
    if reference not in runs or not route_files(runs[reference]):
        print(f"[analyze] difficult: no route file for {reference}; skipped")
        return
    ref = load_route(route_files(runs[reference])[-1])
    # only models of the reference's depth and width (not the RMoE group)
    variants = [v["name"] for v in grid["variants"]
                if v["name"] != reference and v["name"] in runs and route_files(runs[v["name"]])
                and shape_of[v["name"]] == shape_of[reference]]
    rows, plot_data = [], {}
    # Control for regression to the mean: tokens picked for a high reference
    # CE are partly the reference's own noise, so any other model looks
    # better on them. The reference retrained with another seed (its final
    # route file, if made: `motley route --checkpoint RUN --out
    # RUN/route/step_<n>.h5`) shows how large that effect alone is.
    candidates = [(name, route_files(runs[name])[-1]) for name in variants]
    ref_dir = os.path.dirname(runs[reference])
    for other in sorted(glob.glob(os.path.join(ref_dir, "seed*"))):
        if other != runs[reference] and route_files(other):
            candidates.insert(0, (f"{reference} ({os.path.basename(other)}, control)",
                                  route_files(other)[-1]))
    for name, path in candidates:
        var = load_route(path)
        if len(var["ce"]) != len(ref["ce"]) or not np.array_equal(var["targets"], ref["targets"]):
            continue  # different windows (e.g. seq_len); not comparable token by token
        sizes = var["expert_sizes"]
        mean_h = sizes.mean()
        top1_sizes = np.stack([sizes[ld["top1"]] for ld in var["layers"].values()])  # (L, N)
        delta = var["ce"].astype(np.float64) - ref["ce"]
        per = []
        for lo, hi in BUCKETS + [(2, float("inf"))]:
            mask = (ref["ce"] >= lo) & (ref["ce"] < hi)
            n = int(mask.sum())
            if n == 0:
                per.append(None)
                continue
            ts = top1_sizes[:, mask]
            large = float((ts > mean_h).mean())
            small = float((ts < mean_h).mean())
            per.append((n, float(delta[mask].mean()), float(ts.mean()), large, small))
            label = f"[{lo:g}, {hi:g})" if hi != float("inf") else f">= {lo:g}"
            rows.append([name, label, n, f"{ref['ce'][mask].mean():.3f}",
                         f"{var['ce'][mask].mean():.3f}", f"{delta[mask].mean():+.3f}",
                         f"{ts.mean():.0f}", f"{large:.2f}" if sizes.std() > 0 else "-",
                         f"{small:.2f}" if sizes.std() > 0 else "-"])
        plot_data[name] = per
    text = (f"Per-token cross-entropy (nats) on the valid split at the final checkpoint, "
            f"seed {os.path.basename(runs[reference])[4:]}, "
            f"each variant against `{reference}`, bucketed by `{reference}`'s CE. "
            "top-1 h: mean hidden size of the top-1 expert the variant's router picks for "
            "those tokens (over MoE layers); large / small share: how often that expert is "
            "larger / smaller than the mean expert size. The control row retrains the reference "
             "with another seed: buckets chosen by the reference's own CE favour any other "
             "model (regression to the mean), so only the change beyond the control's "
             "counts.\n\n")
    text += md_table(["variant", f"{reference} CE bucket", "tokens", f"{reference} CE",
                      "variant CE", "change", "top-1 h", "large share", "small share"], rows)
    write_md(os.path.join(out, "difficult.md"), "Difficult tokens (MoDSE)", text)
    if not plot_data:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"[{lo:g},{hi:g})" if hi != float("inf") else f">={lo:g}" for lo, hi in BUCKETS]
    w = 0.8 / len(plot_data)
    for i, (name, per) in enumerate(plot_data.items()):
        xs = np.arange(len(BUCKETS)) + i * w
        axes[0].bar(xs, [p[1] if p else 0 for p in per[:len(BUCKETS)]], width=w, label=name)
        axes[1].bar(xs, [p[3] if p else 0 for p in per[:len(BUCKETS)]], width=w, label=name)
    for a in axes:
        a.set_xticks(np.arange(len(BUCKETS)) + 0.4 - w / 2)
        a.set_xticklabels(labels)
        a.set_xlabel(f"{reference} per-token CE bucket (nats)")
        a.grid(axis="y", alpha=0.3)
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set_ylabel(f"mean CE change vs {reference} (nats)")
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("top-1 on a larger-than-mean expert")
    axes[1].axhline(0.5, color="k", lw=0.8, ls=":")
    fig.suptitle("Difficult tokens: CE change and top-1 expert size by baseline difficulty")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "difficult.png"), dpi=100)
    plt.close(fig)


# ---- (b) load over training --------------------------------------------------------


def load_series(run_dir):
    rows = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "expert_tokens" in r]
    steps = np.array([r["step"] for r in rows])
    ratio = []  # (T, L)
    for r in rows:
        ratio.append([max(c) / max(min(c), 1) for c in r["expert_tokens"]])
    act = np.array([r["active_params_per_token"] for r in rows])  # (T, L)
    return steps, np.array(ratio), act


def analyze_load(grid, runs, out, sizes_of):
    rows = []
    groups = list(dict.fromkeys(v.get("group", "") for v in grid["variants"]))
    # the grid's "analysis": {"group_extra": {"HMoE": ["baseline"]}} adds
    # reference variants of another group to a group's panels
    extra = grid.get("analysis", {}).get("group_extra", {})
    by_name = {v["name"]: v for v in grid["variants"]}
    fig, axes = plt.subplots(3, len(groups), figsize=(4.8 * len(groups), 10), squeeze=False)
    seen = set()
    for j, g in enumerate(groups):
        members = [by_name[n] for n in extra.get(g, []) if n in by_name] + \
            [v for v in grid["variants"] if v.get("group", "") == g]
        members = [v for v in members if v["name"] in runs]
        for k, v in enumerate(members):
            steps, ratio, act = load_series(runs[v["name"]])
            if len(steps) == 0:
                continue
            d = sizes_of[v["name"]]["d"]
            mid = len(steps) // 2
            if v["name"] not in seen:
                seen.add(v["name"])
                rows.append([v["name"], f"{np.median(ratio[0]):.1f} (max {ratio[0].max():.0f})",
                             f"{np.median(ratio[mid]):.2f}",
                             f"{np.median(ratio[-1]):.2f} (max {ratio[-1].max():.2f})",
                             f"{act[0].mean() / 1e3:.1f}k", f"{act[-1].mean() / 1e3:.1f}k",
                             " ".join(f"{a / 1e3:.1f}k" for a in act[-1]),
                             f"{act[-1].mean() / (3 * d):.0f}"])
            kw = dict(color=f"C{k}", label=v["name"], lw=1.2,
                      ls=":" if v.get("group", "") != g else "-")
            axes[0][j].plot(steps, np.median(ratio, axis=1), **kw)
            axes[1][j].plot(steps, act.mean(axis=1) / 1e3, **kw)
            L = act.shape[1]
            w = 0.8 / len(members)
            axes[2][j].bar(np.arange(L) + w * k, act[-1] / 1e3, width=w, color=f"C{k}",
                           label=v["name"])
            axes[2][j].set_xticks(np.arange(L) + 0.4 - w / 2)
            axes[2][j].set_xticklabels([str(i) for i in range(L)])
        axes[0][j].set_yscale("log")
        axes[0][j].set_title(g + (f" (dotted: {', '.join(extra[g])})" if extra.get(g) else ""))
        axes[0][j].set_ylabel("max/min tokens per expert\n(median over layers)")
        axes[1][j].set_ylabel("expert params / token / layer (k)")
        axes[1][j].set_xlabel("step")
        axes[2][j].set_ylabel("final expert params / token (k)")
        axes[2][j].set_xlabel("MoE layer")
        for a in axes[:, j]:
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "load.png"), dpi=100)
    plt.close(fig)
    text = ("From metrics.jsonl (the logged step's routed tokens). ratio: max / min tokens per "
            "expert in a layer (min clamped to 1), median over layers at the first logged step, "
            "mid-training and the last step; act.: expert parameters per token per MoE layer "
            "(mean over layers); the last column divides it by 3 d, i.e. hidden units activated "
            "per token per layer (top-2 of 320: 640; RMoE top-2 of 128: 256).\n\n")
    text += md_table(["variant", "ratio first", "ratio mid", "ratio last", "act. first",
                      "act. last", "act. last by layer", "hidden units / token"], rows)
    write_md(os.path.join(out, "load.md"), "Load over training", text)


# ---- (c) routing stability ----------------------------------------------------------


def analyze_stability(grid, runs, out):
    rows, curves = [], {}
    for v in grid["variants"]:
        if v["name"] not in runs:
            continue
        files = route_files(runs[v["name"]])
        if len(files) < 2:
            continue
        data = [load_route(p) for p in files]
        n = min(len(d["ce"]) for d in data)
        steps, changes = [], []
        for a, b in zip(data[:-1], data[1:]):
            per_layer = [float((a["layers"][l]["top1"][:n] != b["layers"][l]["top1"][:n]).mean())
                         for l in a["layers"]]
            steps.append(f"{a['step']}->{b['step']}")
            changes.append(per_layer)
        changes = np.array(changes)
        curves[v["name"]] = (steps, changes.mean(axis=1), v.get("group", ""))
        rows.append([v["name"]] + [f"{c:.3f}" for c in changes.mean(axis=1)])
    if not rows:
        print("[analyze] stability: no route files; skipped")
        return
    steps = max((c[0] for c in curves.values()), key=len)
    text = ("Share of valid tokens whose top-1 expert changes between consecutive checkpoints "
            "(mean over MoE layers; the first route windows of each checkpoint, eval mode).\n\n")
    text += md_table(["variant"] + steps, [r + [""] * (len(steps) + 1 - len(r)) for r in rows])
    write_md(os.path.join(out, "stability.md"), "Routing stability", text)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {}
    for i, (name, (st, ch, g)) in enumerate(curves.items()):
        ls = styles.setdefault(g, ["-", "--", ":", "-."][len(styles) % 4])
        ax.plot(range(len(ch)), ch, marker="o", ms=3, ls=ls, label=name, color=f"C{i % 10}")
    ax.set_xticks(range(len(steps)))
    ax.set_xticklabels(steps, fontsize=8)
    ax.set_xlabel("checkpoint pair (step)")
    ax.set_ylabel("share of tokens whose top-1 expert changes")
    ax.set_title("Routing stability (line style: group)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "stability.png"), dpi=100)
    plt.close(fig)


# ---- (d) RMoE: entropy and cross-layer mutual information ------------------------------


def mutual_information(x, y, e):
    joint = np.bincount(x * e + y, minlength=e * e).reshape(e, e).astype(np.float64)
    joint /= joint.sum()
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (px @ py)[nz])).sum())


def analyze_rmoe(grid, runs, out):
    rows, curves = [], {}
    for v in grid["variants"]:
        if v["name"] not in runs or not route_files(runs[v["name"]]):
            continue
        r = load_route(route_files(runs[v["name"]])[-1])
        layers = sorted(r["layers"])
        e = len(r["expert_sizes"])
        ent = [float(r["layers"][l]["entropy"].mean()) for l in layers]
        mi = [mutual_information(r["layers"][a]["top1"].astype(np.int64),
                                 r["layers"][b]["top1"].astype(np.int64), e)
              for a, b in zip(layers[:-1], layers[1:])]
        curves[v["name"]] = (ent, mi, v.get("group", ""))
        rows.append([v["name"], v.get("group", ""), len(layers), f"{np.mean(ent):.3f}",
                     f"{np.log(e):.3f}", f"{np.mean(mi):.3f}" if mi else "-",
                     " ".join(f"{m:.2f}" for m in mi)])
    if not rows:
        print("[analyze] rmoe: no route files; skipped")
        return
    text = ("Final checkpoint, valid split. entropy: mean per-token router entropy (nats; "
            "uniform = ln E); MI: mutual information (bits) between the top-1 expert of "
            "consecutive MoE layers (max log2 E = 3 bits for E = 8), mean and per layer pair.\n\n")
    text += md_table(["variant", "group", "MoE layers", "gate entropy", "ln E", "MI mean",
                      "MI per layer pair"], rows)
    write_md(os.path.join(out, "rmoe.md"), "RMoE: gate entropy and cross-layer routing MI", text)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, (ent, mi, g)) in enumerate(curves.items()):
        ls = "-" if g == "RMoE" else ":"
        axes[0].plot(range(len(ent)), ent, marker="o", ms=3, ls=ls, label=name, color=f"C{i % 10}")
        axes[1].plot(range(len(mi)), mi, marker="o", ms=3, ls=ls, label=name, color=f"C{i % 10}")
    axes[0].set_xlabel("MoE layer")
    axes[0].set_ylabel("mean router entropy (nats)")
    axes[1].set_xlabel("layer pair (l, l+1)")
    axes[1].set_ylabel("MI of top-1 experts (bits)")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("Gate entropy and cross-layer routing MI (solid: RMoE group, 8 layers)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rmoe.png"), dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("grid")
    ap.add_argument("--root", default=None, help="grid output root (default: runs/experiments/<grid>)")
    ap.add_argument("--out", default=None, help="analysis output (default: ROOT/analysis)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--reference", default="baseline")
    ap.add_argument("--copy-to", default=None, help="also copy the PNGs and tables here")
    args = ap.parse_args()
    grid = json.load(open(args.grid))
    root = args.root or os.path.join(ROOT, "runs", "experiments", grid["name"])
    out = args.out or os.path.join(root, "analysis")
    os.makedirs(out, exist_ok=True)
    seed = args.seed if args.seed is not None else grid["seeds"][0]
    runs, sizes_of = {}, {}
    for v in grid["variants"]:
        d = os.path.join(root, v["name"], f"seed{seed}")
        if os.path.exists(os.path.join(d, "metrics.jsonl")) and os.path.exists(os.path.join(d, "config.json")):
            runs[v["name"]] = d
            cfg = json.load(open(os.path.join(d, "config.json")))
            sizes_of[v["name"]] = {"d": cfg["model"]["d_model"],
                                   "shape": (cfg["model"]["d_model"], cfg["model"]["n_layers"])}
    if not runs:
        print("[analyze] no runs found under", root)
        return 1
    analyze_difficult(grid, runs, args.reference, out,
                      {n: s["shape"] for n, s in sizes_of.items()})
    analyze_load(grid, runs, out, sizes_of)
    analyze_stability(grid, runs, out)
    analyze_rmoe(grid, runs, out)
    if args.copy_to:
        os.makedirs(args.copy_to, exist_ok=True)
        for p in glob.glob(os.path.join(out, "*.png")) + glob.glob(os.path.join(out, "*.md")):
            shutil.copy(p, args.copy_to)
        for p in ("results.md", "results.csv", "eval_bpb.png", "curves.png"):
            if os.path.exists(os.path.join(root, p)):
                shutil.copy(os.path.join(root, p), args.copy_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
