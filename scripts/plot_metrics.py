#!/usr/bin/python3
"""Renders a motley run's metrics.jsonl to a PNG.

    scripts/plot_metrics.py RUN_DIR [--out FILE.png]

Panels: train and eval loss; tokens/s and MFU; for every MoE layer a heatmap
of the share of routed tokens each expert received over training; activated
expert parameters per token by layer.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_rows(path):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"{path}:{n}: skipping a line that is not JSON", file=sys.stderr)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", help="run directory (holding metrics.jsonl) or a metrics.jsonl file")
    ap.add_argument("--out", help="output PNG (default: RUN/metrics.png)")
    args = ap.parse_args()
    path = args.run if args.run.endswith(".jsonl") else os.path.join(args.run, "metrics.jsonl")
    if not os.path.exists(path):
        sys.exit(f"error: {path} does not exist")
    rows = read_rows(path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train:
        sys.exit(f"error: {path} has no training rows")
    out = args.out or os.path.join(os.path.dirname(path) or ".", "metrics.png")

    steps = [r["step"] for r in train]
    n_layers = max((len(r.get("expert_tokens", [])) for r in train), default=0)
    layer_ids = train[-1].get("moe_layers", list(range(n_layers)))
    n_panels = 3 + n_layers
    cols = 2
    rows_n = (n_panels + 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(12, 3.2 * rows_n), squeeze=False)
    axes = axes.ravel()

    ax = axes[0]
    ax.plot(steps, [r["lm_loss"] for r in train], label="train CE")
    ax.plot(steps, [r["loss"] for r in train], label="train CE + aux", alpha=0.6)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval CE")
        if "eval_bpb" in evals[-1]:
            ax.set_title(f"loss (final eval {evals[-1]['eval_loss']:.3f} nats, "
                         f"{evals[-1]['eval_bpb']:.3f} bits/byte)")
        else:
            ax.set_title(f"loss (final eval {evals[-1]['eval_loss']:.3f} nats)")
    else:
        ax.set_title("loss")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[1]
    ax.plot(steps, [r["tokens_per_s"] for r in train], color="tab:green")
    ax.set_ylabel("tokens/s", color="tab:green")
    ax2 = ax.twinx()
    ax2.plot(steps, [100 * r["mfu"] for r in train], color="tab:purple", alpha=0.7)
    ax2.set_ylabel("MFU %", color="tab:purple")
    ax.set_title("throughput")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)

    ax = axes[2]
    for i in range(n_layers):
        ax.plot(steps, [r["active_params_per_token"][i] / 1e3 for r in train],
                label=f"layer {layer_ids[i] if i < len(layer_ids) else i}")
    ax.set_title("activated expert parameters per token (thousands)")
    ax.set_xlabel("step")
    if n_layers:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)

    for i in range(n_layers):
        ax = axes[3 + i]
        share = []
        for r in train:
            counts = r["expert_tokens"][i]
            total = sum(counts) or 1
            share.append([c / total for c in counts])
        im = ax.imshow(list(map(list, zip(*share))), aspect="auto", origin="lower",
                       extent=[steps[0], steps[-1], -0.5, len(share[0]) - 0.5], cmap="viridis")
        ax.set_title(f"layer {layer_ids[i] if i < len(layer_ids) else i}: share of routed tokens per expert")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.set_yticks(range(len(share[0])))
        fig.colorbar(im, ax=ax)
    for j in range(n_panels, len(axes)):
        axes[j].axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(out)


if __name__ == "__main__":
    main()
