#!/usr/bin/python3
"""A cost model for scaling motley's MoE layers to 8..512 GPUs (docs/scaling.md).

    bench/scaling.py --run runs/scaling-modse-e8 [--run DIR ...] [--out FILE.md] [--json FILE]
                     [--gpus 8,16,...,512] [--early 6:30] [--late 241:300] [model and machine flags]
    bench/scaling.py --self-test
    bench/scaling.py --place METHOD --ep N --sizes 576,64,... [--tokens 10,20,...]
    bench/scaling.py --check-bytes RUN:PREFIX     (measured MPI_Alltoallv bytes vs the formula)

Reads the routing statistics of real motley runs (RUN/metrics.jsonl: one row
per logged step with "expert_tokens", per MoE layer the rows computed by
each expert in that step; RUN/config.json: the resolved config) and projects
them onto a large target model of the same expert layout (same E, selection,
size kind; d_model, n_layers, expert_hidden scaled up) on 8..512 GPUs, for
the placements of parallel/placement.cpp (ported here exactly):

  - per-rank expert FLOPs per step and the max/mean load over the EP ranks,
  - EP all-to-all bytes per rank and step (analytic: every routed
    (token, expert) row whose expert lives on another rank crosses the
    network 4 times, d * bytes each: dispatch and combine, forward and
    backward),
  - a step time from a roofline: FLOPs at an assumed fraction of peak,
    bytes at link bandwidths (NVLink inside a node, InfiniBand across),
    1F1B pipeline bubble, data-parallel gradient all-reduce, no overlap.

Every constant is a flag with its default printed by --help. Python 3 with
numpy only. --self-test checks the ports (expert sizes, placements, the
re-placement decision) on owner maps printed by the C++ functions and the
byte and all-to-all time formulas on hand cases; it exits 0, or 77 when
numpy is missing.
"""
import argparse
import json
import math
import os
import sys

try:
    import numpy as np
except ImportError:  # the CTest wrapper turns 77 into a skip
    if "--self-test" in sys.argv:
        print("scaling.py: numpy is missing; self-test skipped")
        sys.exit(77)
    raise

# ---- expert sizes (port of layers/expert_sizes.cpp) ------------------------------------


def round_sizes_keeping_total(raw, total, multiple):
    """Largest-remainder rounding to multiples of `multiple` summing to `total`,
    each at least one multiple; the same loops as the C++."""
    n = len(raw)
    assert multiple >= 1 and total % multiple == 0, (total, multiple)
    units = total // multiple
    assert units >= n, "cannot give every expert one multiple"
    raw_sum = 0.0
    for r in raw:
        raw_sum += r
    out, remainder, assigned = [], [], 0
    for r in raw:
        exact = r / raw_sum * float(units)
        o = max(1, int(math.floor(exact)))
        out.append(o)
        remainder.append(exact - float(o))
        assigned += o
    order = sorted(range(n), key=lambda i: -remainder[i])  # stable: ties to the lower index
    i = 0
    while assigned < units:
        out[order[i]] += 1
        assigned += 1
        i = (i + 1) % n
    i = n - 1
    while assigned > units:
        if out[order[i]] > 1:
            out[order[i]] -= 1
            assigned -= 1
        i = (i + n - 1) % n
    return [o * multiple for o in out]


def expert_hidden_sizes(kind, n_experts, expert_hidden, size_multiple=8):
    e = n_experts
    if e == 0:
        return []
    if isinstance(kind, list):
        return list(kind)
    if kind == "uniform":
        return [expert_hidden] * e
    raw = [0.0] * e
    if kind == "modse":
        assert e % 2 == 0, "modse needs an even number of experts"
        pairs = e // 2
        for i in range(pairs):
            if e == 8:
                big = [1.8, 1.6, 1.2, 1.0][i]
            else:
                big = 1.8 if pairs == 1 else 1.8 - 0.8 * float(i) / (pairs - 1)
            raw[2 * i] = big
            raw[2 * i + 1] = 2.0 - big
    elif kind == "arithmetic":
        raw = [9.0 + 2.0 * i for i in range(e)]
    else:
        raise ValueError(f"unknown expert_sizes {kind!r}")
    return round_sizes_keeping_total(raw, e * expert_hidden, size_multiple)


# ---- placement (port of parallel/placement.cpp) ------------------------------------------


def _greedy(weight, ep, capacity):
    """Items by decreasing weight (stable by index) onto the least loaded rank
    with room (strictly less: ties to the lower rank)."""
    order = sorted(range(len(weight)), key=lambda i: -weight[i])  # Python's sort is stable
    load = [0.0] * ep
    used = [0] * ep
    rank_of = [-1] * len(weight)
    for i in order:
        best = -1
        for r in range(ep):
            if used[r] >= capacity:
                continue
            if best < 0 or load[r] < load[best]:
                best = r
        assert best >= 0, "no rank with room"
        rank_of[i] = best
        load[best] += weight[i]
        used[best] += 1
    return rank_of


def _check_divides(n, ep):
    if ep < 1 or n % ep != 0:
        raise ValueError(f"parallel.ep = {ep} must divide the number of experts {n}")


def place_contiguous(n_experts, ep):
    _check_divides(n_experts, ep)
    per = n_experts // ep
    return [e // per for e in range(n_experts)]


def place_balanced(load, ep):
    _check_divides(len(load), ep)
    return _greedy([float(x) for x in load], ep, len(load) // ep)


def place_pairs(sizes, ep):
    n = len(sizes)
    _check_divides(n, ep)
    per = n // ep
    if per % 2 != 0:
        return place_balanced([float(s) for s in sizes], ep)
    desc = sorted(range(n), key=lambda i: -sizes[i])
    pairs, pair_weight = [], []
    for i in range(n // 2):
        big, small = desc[i], desc[n - 1 - i]
        pairs.append((big, small))
        pair_weight.append(float(sizes[big] + sizes[small]))
    pair_rank = _greedy(pair_weight, ep, per // 2)
    owner = [-1] * n
    for p, (big, small) in enumerate(pairs):
        owner[big] = pair_rank[p]
        owner[small] = pair_rank[p]
    return owner


def place_experts(method, sizes, ep, tokens=None):
    n = len(sizes)
    if method == "contiguous":
        return place_contiguous(n, ep)
    if method == "pairs":
        return place_pairs(sizes, ep)
    if method != "balanced":
        raise ValueError(f"unknown parallel.placement {method!r}")
    load = [(1.0 if not tokens else float(tokens[e])) * float(sizes[e]) for e in range(n)]
    return place_balanced(load, ep)


def max_rank_load(owner, load, ep):
    s = [0.0] * ep
    for e, o in enumerate(owner):
        s[o] += load[e]
    return max(s)


def layered_max_load(owner, layer_load, ep):
    """Port of parallel::layered_max_load: sum over layers of each layer's
    largest per-rank load (Note [Re-placement])."""
    return sum(max_rank_load(owner, load, ep) for load in layer_load)


def improve_by_swaps(owner, layer_load, ep, max_passes=64):
    """Port of parallel::improve_by_swaps: apply the pairwise swap that lowers
    layered_max_load the most (ties: first (a, b)) until none does."""
    owner = list(owner)
    n = len(owner)
    sums = []
    for load in layer_load:
        s = [0.0] * ep
        for e, o in enumerate(owner):
            s[o] += load[e]
        sums.append(s)

    def layer_max(l, ra, va, rb, vb):
        m = 0.0
        for r in range(ep):
            m = max(m, va if r == ra else vb if r == rb else sums[l][r])
        return m

    cost = sum(layer_max(l, -1, 0.0, -1, 0.0) for l in range(len(layer_load)))
    for _ in range(max_passes):
        best, best_a, best_b = cost, None, None
        for a in range(n):
            for b in range(a + 1, n):
                ra, rb = owner[a], owner[b]
                if ra == rb:
                    continue
                c = 0.0
                for l, load in enumerate(layer_load):
                    if not c < best:
                        break
                    d = load[b] - load[a]
                    c += layer_max(l, ra, sums[l][ra] + d, rb, sums[l][rb] - d)
                if c < best:
                    best, best_a, best_b = c, a, b
        if best_a is None:
            break
        ra, rb = owner[best_a], owner[best_b]
        for l, load in enumerate(layer_load):
            d = load[best_b] - load[best_a]
            sums[l][ra] += d
            sums[l][rb] -= d
        owner[best_a], owner[best_b] = rb, ra
        cost = best
    return owner


def decide_replacement(current, layer_tokens, sizes, ep, min_gain=0.05):
    """Port of parallel::decide_replacement (Note [Re-placement]): the cheaper
    of two swap searches (from the LPT map of the layer-summed load, and from
    the current map; ties: the latter) under the per-layer cost, adopted only
    if it lowers that cost by at least min_gain. `layer_tokens` is (L, E), or
    one list of E for a single layer. Returns (replace, candidate)."""
    if layer_tokens and not hasattr(layer_tokens[0], "__len__"):
        layer_tokens = [layer_tokens]
    n = len(sizes)
    layer_load = [[float(t[e]) * float(sizes[e]) for e in range(n)] for t in layer_tokens]
    summed = [sum(layer[e] for layer in layer_load) for e in range(n)]
    from_lpt = improve_by_swaps(place_balanced(summed, ep), layer_load, ep)
    from_current = improve_by_swaps(current, layer_load, ep)
    cost_lpt = layered_max_load(from_lpt, layer_load, ep)
    cost_current = layered_max_load(from_current, layer_load, ep)
    candidate = from_lpt if cost_lpt < cost_current else from_current
    candidate_cost = min(cost_lpt, cost_current)
    current_cost = layered_max_load(current, layer_load, ep)
    return current_cost > 0 and candidate_cost <= (1.0 - min_gain) * current_cost, candidate


def replay_replacement(run, sizes, ep, every, min_gain, before_step):
    """The `balanced` map motley's trainer would hold at step `before_step`:
    it starts from the sizes alone and, after every `every`-th step, decides
    on the tokens routed since the last decision (summed over MoE layers).
    Needs every step logged (train.log_every = 1)."""
    owner = place_experts("balanced", sizes, ep)
    if every <= 0 or ep == 1:
        return owner
    window = np.zeros(run.counts.shape[1:])  # (L, E): the trainer keeps layers apart
    for step, counts in zip(run.steps, run.counts):
        if step >= before_step:
            break
        window += counts
        if step % every == 0:
            replace, candidate = decide_replacement(owner, window.tolist(), sizes, ep, min_gain)
            if replace:
                owner = candidate
            window[:] = 0.0
    return owner


# ---- routing statistics from metrics.jsonl ----------------------------------------------


def read_jsonl(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


class Run:
    """A measured run: its resolved config and the per-step expert_tokens
    (steps, MoE layers, experts)."""

    def __init__(self, run_dir):
        self.dir = run_dir
        self.name = os.path.basename(os.path.normpath(run_dir))
        with open(os.path.join(run_dir, "config.json")) as f:
            self.config = json.load(f)
        rows = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
                if r.get("expert_tokens")]
        if not rows:
            raise SystemExit(f"{run_dir}/metrics.jsonl has no expert_tokens rows")
        # a resumed run may log a step twice: keep the last row of each step
        by_step = {r["step"]: r for r in rows}
        self.steps = np.array(sorted(by_step))
        self.counts = np.array([by_step[s]["expert_tokens"] for s in self.steps], dtype=np.float64)
        moe = self.config["model"]["moe"]
        self.moe = moe
        kind = moe["expert_sizes"]
        if kind == "list":
            kind = moe.get("expert_size_list")
        self.sizes = expert_hidden_sizes(kind, moe["n_experts"], moe["expert_hidden"],
                                         moe.get("size_multiple", 8))
        tc = self.config["train"]
        self.tokens_per_step = tc["batch_size"] * tc["seq_len"]
        self.every_step_logged = bool(np.array_equal(self.steps, np.arange(1, len(self.steps) + 1)))
        assert self.counts.shape[2] == moe["n_experts"], "expert_tokens width != n_experts"

    def window(self, lo, hi):
        """Statistics over logged steps lo <= step <= hi."""
        sel = (self.steps >= lo) & (self.steps <= hi)
        if not sel.any():
            raise SystemExit(f"{self.name}: no logged step in [{lo}, {hi}]")
        return Window(self, lo, hi, self.counts[sel])


class Window:
    """Routing over a window of steps: share[l, e] = fraction of layer l's
    routed rows that went to expert e (summed over the window's steps);
    rows_per_token[l] = routed rows per token (k for top-k, measured for
    top-p); per_step[s, l, e] = the window's per-step rows per expert."""

    def __init__(self, run, lo, hi, counts):
        self.run, self.lo, self.hi = run, lo, hi
        self.n_steps = counts.shape[0]
        tot = counts.sum(axis=0)  # (L, E)
        self.share = tot / tot.sum(axis=1, keepdims=True)
        self.rows_per_token = tot.sum(axis=1) / (self.n_steps * run.tokens_per_step)
        self.per_step = counts  # (steps, L, E) rows per expert
        self.tokens_per_expert = tot.sum(axis=0)  # what a re-placing `balanced` would measure

    def label(self):
        return f"steps {self.lo}-{self.hi}"


# ---- target model ---------------------------------------------------------------------------


class Target:
    """The projected model: the measured run's expert layout (E, selection,
    size kind, router) at a larger d_model / depth. Expert sizes are the
    size kind's formula at expert_hidden = measured expert_hidden * (d / d_measured)."""

    def __init__(self, run, args):
        m = run.config["model"]
        moe = run.moe
        self.d = args.d_model
        self.n_layers = args.n_layers
        self.n_heads = args.n_heads
        self.vocab = args.vocab
        self.seq = args.seq_len
        self.n_experts = moe["n_experts"]
        self.expert_hidden = int(round(moe["expert_hidden"] * self.d / m["d_model"]))
        kind = moe["expert_sizes"]
        if isinstance(kind, list) or kind == "list":  # explicit sizes: scaled like d
            mult = args.size_multiple
            self.sizes = [max(mult, int(round(h * self.d / m["d_model"] / mult)) * mult)
                          for h in run.sizes]
        else:
            self.sizes = expert_hidden_sizes(kind, self.n_experts, self.expert_hidden,
                                             args.size_multiple)
        self.every = moe.get("every", 1)
        self.first_dense = moe.get("first_dense", 0)
        self.ffn_hidden = int(round(m["ffn_hidden"] * self.d / m["d_model"]))
        self.router = moe["router"]
        self.gru_dim = moe.get("gru_dim", 128)
        self.moe_layers = [l for l in range(self.n_layers)
                           if l >= self.first_dense and l % self.every == self.every - 1]
        # target MoE layer j uses the statistics of measured MoE layer
        # j mod L_measured: every pipeline stage then sees the measured
        # layers in equal numbers (stretching the depth instead would give
        # each stage the copies of one measured layer, and make the slowest
        # stage the most skewed layer)
        self.n_measured = run.counts.shape[1]
        self.layer_map = [j % self.n_measured for j in range(len(self.moe_layers))]

    def describe(self):
        return (f"d {self.d}, {self.n_layers} layers ({len(self.moe_layers)} MoE), {self.n_heads} heads, "
                f"vocab {self.vocab}, seq {self.seq}, E {self.n_experts}, expert sizes "
                f"{' '.join(str(s) for s in self.sizes)}")

    def layer_params(self, l):
        """Non-expert parameters of layer l (attention, norms, router or dense FFN)."""
        d, e = self.d, self.n_experts
        p = 4 * d * d + 2 * d
        if l not in self.moe_layers:
            return p + 3 * d * self.ffn_hidden
        if self.router == "gru":
            return p + self.gru_dim * d + e * self.gru_dim
        return p + (2 if self.router == "noisy" else 1) * e * d

    def expert_params_layer(self):
        return sum(3 * self.d * h for h in self.sizes)

    def total_params(self):
        gru = 6 * self.gru_dim * self.gru_dim + 6 * self.gru_dim if self.router == "gru" else 0
        return (2 * self.vocab * self.d + self.d + sum(self.layer_params(l) for l in range(self.n_layers))
                + len(self.moe_layers) * self.expert_params_layer() + gru)


def stage_layers(n_layers, pp, stage):
    """Port of parallel::stage_layers: the first n_layers % pp stages get one extra layer."""
    base, extra = n_layers // pp, n_layers % pp
    begin = stage * base + min(stage, extra)
    return range(begin, begin + base + (1 if stage < extra else 0))


# ---- the cost model -----------------------------------------------------------------------


def ep_rank_shares(share_l, owner, ep):
    """S[r] = token share of EP rank r's experts (share_l: one layer's shares)."""
    s = np.zeros(ep)
    for e, o in enumerate(owner):
        s[o] += share_l[e]
    return s


def ep_bytes_per_rank(tokens, rows_per_token, ep, d, bytes_per_el):
    """Analytic EP volume one rank sends per MoE layer and step (the 4
    transfers: dispatch and combine, forward and backward), for a uniform
    owner of every expert among the ep ranks: each of its tokens * k rows
    goes to a non-local owner with probability (ep - 1) / ep."""
    return 4.0 * tokens * rows_per_token * (ep - 1) / ep * d * bytes_per_el


def alltoall_time(S, tokens, rows_per_token, d, args):
    """Time of ONE of the 4 transfers of an MoE layer, for EP ranks with token
    shares S (sum 1), each rank routing `tokens` * k rows with the same
    distribution. Rank r sends tokens*k*S[q] rows to each peer q != r and
    receives tokens*k*S[r] rows from each peer. NVLink (inside a node of
    gpus_per_node) and InfiniBand run concurrently, ingress and egress too:
    the transfer takes the slowest of the four per-rank streams."""
    ep = len(S)
    if ep == 1:
        return 0.0, 0.0
    row = d * args.act_bytes
    node = args.gpus_per_node
    worst = 0.0
    max_recv_rows = 0.0
    for r in range(ep):
        same = [q for q in range(ep) if q != r and q // node == r // node]
        other = [q for q in range(ep) if q // node != r // node]
        rows = tokens * rows_per_token
        send_nv = rows * sum(S[q] for q in same) * row
        send_ib = rows * sum(S[q] for q in other) * row
        recv_nv = len(same) * rows * S[r] * row
        recv_ib = len(other) * rows * S[r] * row
        t = max(send_nv / (args.nvlink_gbs * 1e9 * args.comm_eff),
                recv_nv / (args.nvlink_gbs * 1e9 * args.comm_eff),
                send_ib / (args.ib_gbs * 1e9 * args.comm_eff),
                recv_ib / (args.ib_gbs * 1e9 * args.comm_eff))
        worst = max(worst, t)
        max_recv_rows = max(max_recv_rows, (len(same) + len(other)) * rows * S[r])
    return worst, max_recv_rows


def ring_allreduce_time(n_elems, group, spans_nodes, args):
    if group <= 1 or n_elems == 0:
        return 0.0
    bw = (args.ib_gbs if spans_nodes else args.nvlink_gbs) * 1e9 * args.comm_eff
    return 2.0 * (group - 1) / group * n_elems * args.grad_bytes / bw


def ep_choices(n_experts, dp, spec):
    """EP sizes to project: --ep-list (comma-separated; 'E' means n_experts),
    default {E/4, E/2, E, min(E, 8)} and, when none of those fits, the largest
    that does; only sizes dividing E and dp."""
    if spec:
        want = [n_experts if x.strip() == "E" else int(x) for x in spec.split(",")]
    else:
        want = [n_experts // 4, n_experts // 2, n_experts, min(n_experts, 8)]
    ok = sorted({e for e in want if e >= 1 and n_experts % e == 0 and dp % e == 0})
    if not ok and not spec:
        ok = [max(e for e in range(1, min(n_experts, dp) + 1) if n_experts % e == 0 and dp % e == 0)]
    return ok


def rank_params(target, pp, owner, ep):
    """Largest parameter count held by one rank: its stage's dense parameters
    (embedding on the first stage, final norm and lm_head on the last) plus
    its experts of that stage's MoE layers."""
    worst = 0.0
    for s in range(pp):
        layers = stage_layers(target.n_layers, pp, s)
        dense = sum(target.layer_params(l) for l in layers)
        if s == 0:
            dense += target.vocab * target.d
        if s == pp - 1:
            dense += target.vocab * target.d + target.d
        n_moe = sum(1 for l in layers if l in target.moe_layers)
        experts = max(sum(3 * target.d * target.sizes[e] for e in range(len(owner)) if owner[e] == r)
                      for r in range(ep))
        worst = max(worst, dense + n_moe * experts)
    return worst


def project(target, win, gpus, ep, owner, args):
    """Loads, bytes and step time of one layout and placement for the routing
    of window `win`. Weak scaling: every dp rank takes micro_batches x
    micro_batch_seqs sequences per step."""
    pp = args.pp
    dp = gpus // pp
    d = target.d
    m = args.micro_batches
    tokens = m * args.micro_batch_seqs * target.seq  # per dp rank and step
    peak = args.peak_tflops * 1e12 * args.flop_eff
    node = args.gpus_per_node
    sizes = np.array(target.sizes, dtype=np.float64)
    row_flops = 18.0 * d * sizes  # per routed row: 6 per expert parameter (3 d h_e), as step_flops
    stages = []
    exp_max_sum = exp_mean_sum = 0.0
    model_flops = 0.0
    for s in range(pp):
        layers = stage_layers(target.n_layers, pp, s)
        st = {"dense": 0.0, "expert": 0.0, "a2a": 0.0, "p2p": 0.0, "ep_bytes": 0.0, "recv_rows": 0.0}
        dense_flops = 0.0
        for l in layers:
            # 6 per non-expert parameter plus attention's 12 T d per token (train.cpp step_flops)
            dense_flops += tokens * (6.0 * target.layer_params(l) + 12.0 * target.seq * d)
            if l not in target.moe_layers:
                continue
            ml = target.layer_map[target.moe_layers.index(l)]
            share, k = win.share[ml], win.rows_per_token[ml]
            rank_flops = np.zeros(ep)
            for e, o in enumerate(owner):
                # the owner computes expert e for the tokens of all ep ranks of its group
                rank_flops[o] += ep * tokens * k * share[e] * row_flops[e]
            exp_max_sum += rank_flops.max()
            exp_mean_sum += rank_flops.mean()
            model_flops += rank_flops.mean()
            st["expert"] += rank_flops.max() / peak  # the all-to-all waits for the slowest rank
            t1, recv = alltoall_time(ep_rank_shares(share, owner, ep), tokens, k, d, args)
            st["a2a"] += 4.0 * t1
            st["recv_rows"] = max(st["recv_rows"], recv)
            st["ep_bytes"] += ep_bytes_per_rank(tokens, k, ep, d, args.act_bytes)
        if s == pp - 1:
            dense_flops += tokens * 6.0 * (target.vocab * d + d)  # lm_head (the embedding is a lookup)
        model_flops += dense_flops
        st["dense"] = dense_flops / peak
        if pp > 1:
            # x (tokens / m, d) forward and its gradient backward per micro-batch
            # and boundary; the neighbouring stage is dp ranks away
            bw = (args.ib_gbs if dp >= node else args.nvlink_gbs) * 1e9 * args.comm_eff
            st["p2p"] = (2 if 0 < s < pp - 1 else 1) * 2.0 * tokens * d * args.act_bytes / bw
        st["total"] = st["dense"] + st["expert"] + st["a2a"] + st["p2p"]
        stages.append(st)
    crit = max(stages, key=lambda st: st["total"])
    pipe = crit["total"] * (m + pp - 1) / m  # 1F1B: m + pp - 1 slots of the slowest stage
    # gradient all-reduce after the last backward, not overlapped: a stage's
    # dense parameters over its dp group, a rank's experts over dp / ep
    ar = 0.0
    for s in range(pp):
        layers = stage_layers(target.n_layers, pp, s)
        dense = (sum(target.layer_params(l) for l in layers) + (target.vocab * d if s == 0 else 0)
                 + (target.vocab * d + d if s == pp - 1 else 0))
        n_moe = sum(1 for l in layers if l in target.moe_layers)
        experts = n_moe * max(sum(3 * d * sizes[e] for e in range(len(owner)) if owner[e] == r)
                              for r in range(ep))
        ar = max(ar, ring_allreduce_time(dense, dp, dp > node, args)
                 + ring_allreduce_time(experts, dp // ep, dp > node, args))
    ar *= 1.0 - args.ar_overlap
    step = pipe + ar
    params = rank_params(target, pp, owner, ep)
    return {
        "gpus": gpus, "pp": pp, "dp": dp, "ep": ep, "owner": list(owner),
        "tokens_per_rank": tokens, "global_tokens": tokens * dp,
        "max_over_mean": exp_max_sum / exp_mean_sum if exp_mean_sum else 1.0,
        "worst_layer": max_layer_imbalance(target, win, owner, ep, sizes),
        "per_step": per_step_imbalance(target, win, owner, ep, sizes),
        "step_s": step, "allreduce_s": ar, "bubble_s": pipe - crit["total"],
        "dense_s": crit["dense"], "expert_s": crit["expert"], "a2a_s": crit["a2a"], "p2p_s": crit["p2p"],
        "ep_bytes_rank": sum(st["ep_bytes"] for st in stages) / pp,
        "max_recv_rows": max(st["recv_rows"] for st in stages),
        "tokens_per_s": tokens * dp / step,
        "mfu": model_flops * dp / step / (gpus * args.peak_tflops * 1e12),
        "rank_params": params,
        "rank_gb_replicated": params * args.bytes_per_param / 1e9,
    }


def per_layer_lpt_imbalance(target, win, ep):
    """Oracle, not a motley placement: a separate LPT map per MoE layer from
    that layer's window shares (motley uses one map for all layers). The
    same ratio as max_over_mean."""
    sizes = np.array(target.sizes, dtype=np.float64)
    mx = mn = 0.0
    for ml in target.layer_map:
        load = win.share[ml] * win.rows_per_token[ml] * sizes  # layers weigh by their rows
        owner = place_balanced(list(load), ep)
        f = np.zeros(ep)
        for e, o in enumerate(owner):
            f[o] += load[e]
        mx += f.max()
        mn += f.mean()
    return mx / mn


def max_layer_imbalance(target, win, owner, ep, sizes):
    worst = 1.0
    for ml in set(target.layer_map):
        f = np.zeros(ep)
        for e, o in enumerate(owner):
            f[o] += win.share[ml][e] * sizes[e]
        worst = max(worst, f.max() / f.mean())
    return worst


def per_step_imbalance(target, win, owner, ep, sizes):
    """Mean over the window's steps of sum_l max_r / sum_l mean_r with each
    step's own counts (includes the sampling noise of the measured run's small
    batches, larger than at the target's batch size); layers weigh by their
    rows in that step, as in max_over_mean."""
    vals = []
    for st in win.per_step:
        mx = mn = 0.0
        for ml in target.layer_map:
            f = np.zeros(ep)
            for e, o in enumerate(owner):
                f[o] += st[ml][e] * sizes[e]
            mx += f.max()
            mn += f.mean()
        vals.append(mx / mn if mn else 1.0)
    return float(np.mean(vals))


# ---- report -------------------------------------------------------------------------------


def parse_window(text):
    lo, hi = text.split(":")
    return int(lo), int(hi)


def placements_for(target, run, early, win, args):
    """The placements compared: motley's three, with `balanced` as it starts
    (no statistics: load = h_e) and as its re-placement rule would have moved
    it by the window's first step (replayed on the run's logged tokens); and
    two one-off LPT maps from measured tokens: of the early window (stale
    later on) and of the window projected (an oracle)."""
    sizes = target.sizes
    out = {
        "contiguous": lambda ep: place_experts("contiguous", sizes, ep),
        "pairs": lambda ep: place_experts("pairs", sizes, ep),
        "balanced": lambda ep: place_experts("balanced", sizes, ep),
        "balanced+replace": lambda ep: replay_replacement(run, sizes, ep, args.replace_every,
                                                          args.replace_min_gain, win.lo),
        "balanced@early": lambda ep: place_experts("balanced", sizes, ep, list(early.tokens_per_expert)),
    }
    if win is not early:
        out["balanced@window"] = lambda ep: place_experts("balanced", sizes, ep,
                                                          list(win.tokens_per_expert))
    return out


def routing_table(run, wins):
    lines = ["| run | window | rows/token | max/min expert share, per layer | small experts' share "
             "/ their count share | mean routed h / mean h |", "|---|---|---|---|---|---|"]
    sizes = np.array(run.sizes, dtype=np.float64)
    small = sizes < sizes.mean()  # experts smaller than the mean size
    for w in wins:
        ratios = " ".join(f"{w.share[l].max() / max(w.share[l].min(), 1e-12):.2f}"
                          for l in range(w.share.shape[0]))
        small_share = (f"{w.share[:, small].sum(axis=1).mean() / (small.sum() / len(sizes)):.3f}"
                       if small.any() else "-")
        mean_h = (w.share * sizes).sum(axis=1).mean() / sizes.mean()
        lines.append(f"| {run.name} | {w.label()} | {w.rows_per_token.mean():.2f} | {ratios} | "
                     f"{small_share} | {mean_h:.3f} |")
    return "\n".join(lines) + "\n"


def load_table(target, wins, eps, owners_of, args):
    """max/mean per-rank expert FLOPs for every (window, ep) and placement
    (independent of the GPU count under weak scaling)."""
    names = list(owners_of[wins[-1].label()])
    lines = ["| window | ep | " + " | ".join(names) + " | LPT per layer (oracle) | params/rank (B), "
             "pairs | GB/rank |", "|" + "---|" * (len(names) + 5)]
    for w in wins:
        for ep in eps:
            cells = []
            for n in names:
                fn = owners_of[w.label()].get(n)
                if fn is None:
                    cells.append("")
                    continue
                owner = fn(ep)
                r = project(target, w, ep * args.pp, ep, owner, args)
                cells.append(f"{r['max_over_mean']:.3f} ({r['worst_layer']:.2f}; {r['per_step']:.2f})")
            pr = rank_params(target, args.pp, place_experts("pairs", target.sizes, ep), ep) / 1e9
            lines.append(f"| {w.label()} | {ep} | " + " | ".join(cells) +
                         f" | {per_layer_lpt_imbalance(target, w, ep):.3f} | {pr:.2f} | "
                         f"{pr * args.bytes_per_param:.0f} |")
    return "\n".join(lines) + "\n"


SHORT = {"contiguous": "cont", "pairs": "pairs", "balanced": "bal", "balanced+replace": "bal+re",
         "balanced@early": "bal@early",
         "balanced@window": "bal@win"}


def step_table(target, win, gpus_list, owner_of, args):
    eps_all = sorted({e for g in gpus_list for e in ep_choices(target.n_experts, g // args.pp, args.ep_list)})
    head = "| GPUs | " + " | ".join(f"ep {e}: step s [best], worst/best; EP GB/rank" for e in eps_all) + " |"
    lines = [head, "|" + "---|" * (len(eps_all) + 1)]
    results = []
    for g in gpus_list:
        if g % args.pp:
            continue
        cells = []
        for ep in eps_all:
            if ep not in ep_choices(target.n_experts, g // args.pp, args.ep_list):
                cells.append("-")
                continue
            rs = {n: project(target, win, g, ep, fn(ep), args) for n, fn in owner_of.items()}
            results.extend(dict(r, placement=n, window=win.label()) for n, r in rs.items())
            times = {n: r["step_s"] for n, r in rs.items()}
            best = min(times, key=lambda n: (times[n], list(times).index(n)))
            worst = max(times.values())
            tied = [n for n in times if abs(times[n] - times[best]) <= 1e-3 * times[best]]
            label = "all" if len(tied) == len(times) else "/".join(SHORT[n] for n in tied)
            cells.append(f"{times[best]:.2f} [{label}], {worst / times[best]:.3f}; "
                         f"{rs[best]['ep_bytes_rank'] / 1e9:.1f}")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", results


def breakdown_table(target, win, gpus_list, ep, name, fn, args):
    lines = ["| GPUs | pp x dp, ep | dense s | expert s (max rank) | all-to-all s | p2p s | bubble s | "
             "all-reduce s | step s | EP GB/rank | max recv rows/layer | tokens/s | MFU |",
             "|" + "---|" * 13]
    for g in gpus_list:
        if g % args.pp or ep not in ep_choices(target.n_experts, g // args.pp, args.ep_list):
            continue
        p = project(target, win, g, ep, fn(ep), args)
        lines.append(f"| {g} | {p['pp']} x {p['dp']}, {ep} | {p['dense_s']:.3f} | {p['expert_s']:.3f} | "
                     f"{p['a2a_s']:.3f} | {p['p2p_s']:.3f} | {p['bubble_s']:.3f} | {p['allreduce_s']:.3f} | "
                     f"{p['step_s']:.3f} | {p['ep_bytes_rank'] / 1e9:.1f} | {p['max_recv_rows']:.0f} | "
                     f"{p['tokens_per_s'] / 1e6:.2f}M | {100 * p['mfu']:.1f}% |")
    return f"Breakdown ({win.label()}, {name}, ep {ep}):\n\n" + "\n".join(lines) + "\n"


def report(args):
    gpus = [int(g) for g in args.gpus.split(",")]
    md = []
    dump = {"params": vars(args), "runs": []}
    for rd in args.run:
        run = Run(rd)
        n = int(run.steps.max())
        early = run.window(*(parse_window(args.early) if args.early else
                             (max(2, round(0.05 * n) + 1), round(0.2 * n))))
        late = run.window(*(parse_window(args.late) if args.late else (round(0.8 * n) + 1, n)))
        target = Target(run, args)
        sel = run.moe.get("selection", "topk")
        md.append(f"### {run.name}\n\nMeasured: {run.moe['n_experts']} experts "
                  f"({run.moe['expert_sizes']}: {' '.join(map(str, run.sizes))}), "
                  f"{sel} {run.moe['top_k'] if sel == 'topk' else run.moe.get('top_p')}, "
                  f"router {run.moe['router']}, {n} steps of {run.tokens_per_step} tokens.\n"
                  f"Target: {target.describe()}; {target.total_params() / 1e9:.1f}B parameters.\n\n")
        md.append(routing_table(run, [early, late]) + "\n")
        if args.replace_every > 0 and not run.every_step_logged:
            print(f"warning: {run.name} does not log every step; the re-placement replay sees only "
                  "the logged steps", file=sys.stderr)
        owners_of = {w.label(): placements_for(target, run, early, w, args) for w in (early, late)}
        eps = ep_choices(target.n_experts, max(gpus) // args.pp, args.ep_list)
        # max/mean: sum over MoE layers of the layer-wise maximum over EP ranks,
        # over the sum of the means, from the window's mean shares; in
        # brackets the worst single layer and the same ratio from each step's
        # own counts, averaged over the window's steps (docs/scaling.md)
        md.append("Per-rank expert FLOPs, max over mean (worst layer; per step):\n\n")
        md.append(load_table(target, [early, late], eps, owners_of, args) + "\n")
        entry = {"run": run.name, "target": target.describe(), "sizes": target.sizes,
                 "windows": {}, "routing": {}}
        for w in (early, late):
            text, results = step_table(target, w, gpus, owners_of[w.label()], args)
            # the best step time [placements within 0.1 % of it], the slowest
            # placement's over the best; EP all-to-all GB sent per rank and step
            md.append(f"Step time, {w.label()} (s [best placements], worst/best; EP GB/rank):\n\n"
                      + text + "\n")
            entry["windows"][w.label()] = results
            entry["routing"][w.label()] = {"share": w.share.tolist(),
                                           "rows_per_token": w.rows_per_token.tolist()}
        ep_b = args.breakdown_ep or (target.n_experts // 2 if target.n_experts >= 2 else 1)
        if ep_b in eps:
            md.append(breakdown_table(target, late, gpus, ep_b, "pairs", owners_of[late.label()]["pairs"],
                                      args) + "\n")
        dump["runs"].append(entry)
    text = "".join(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)


# ---- measured EP bytes against the formula -------------------------------------------------


def check_bytes(run_dir, prefix, elem_bytes):
    """Compares the bytes each rank of a real `mpirun ... motley train` run sent
    to other ranks through MPI_Alltoallv (PREFIX.<world rank>: "calls
    remote_bytes self_bytes", written by the PMPI counter of docs/scaling.md)
    with (a) the analytic volume 4 T k (ep - 1)/ep d b per rank, MoE layer and
    step, and (b) the per-rank model 2 T k ((1 - S_r) + (ep - 1) S_r) d b with
    S_r the token share of rank r's experts (dispatch and combine, forward and
    backward), both from the run's logged (world-reduced) expert_tokens.
    Needs every step logged and pp = 1; takes the placement's starting map (a
    `balanced` run that re-placed experts would differ)."""
    run = Run(run_dir)
    par = run.config.get("parallel", {})
    dp, ep, pp = par.get("dp", 1), par.get("ep", 1), par.get("pp", 1)
    if pp != 1 or not run.every_step_logged:
        raise SystemExit("check-bytes needs pp = 1 and train.log_every = 1")
    d = run.config["model"]["d_model"]
    owner = place_experts(par.get("placement", "contiguous"), run.sizes, ep)
    analytic = 0.0
    per_rank = np.zeros(ep)
    for counts in run.counts:  # (L, E) world totals of one step
        for row in counts:
            rows = row.sum() / dp  # routed rows of one dp rank (same distribution on every rank)
            analytic += 4.0 * rows * (ep - 1) / ep * d * elem_bytes
            S = ep_rank_shares(row / row.sum(), owner, ep)
            per_rank += 2.0 * rows * ((1.0 - S) + (ep - 1) * S) * d * elem_bytes
    lines = [f"{run.name}: dp {dp}, ep {ep}, placement {par.get('placement')}, {len(run.steps)} steps, "
             f"d {d}, {elem_bytes}-byte elements",
             "| world rank | ep_rank | alltoallv calls | measured MB sent | analytic MB | "
             "measured / analytic | per-rank model MB | measured / model |", "|---|---|---|---|---|---|---|---|"]
    measured = []
    for rank in range(dp):
        with open(f"{prefix}.{rank}") as f:
            calls, remote, _ = (int(x) for x in f.read().split())
        measured.append(remote)
        m = per_rank[rank % ep]
        lines.append(f"| {rank} | {rank % ep} | {calls} | {remote / 1e6:.3f} | {analytic / 1e6:.3f} | "
                     f"{remote / analytic:.4f} | {m / 1e6:.3f} | {remote / m:.4f} |")
    total = sum(measured)
    lines.append(f"| all | | | {total / 1e6:.3f} | {dp * analytic / 1e6:.3f} | "
                 f"{total / (dp * analytic):.4f} | {dp / ep * per_rank.sum() / 1e6:.3f} | "
                 f"{total / (dp / ep * per_rank.sum()):.4f} |")
    print("\n".join(lines) + "\n")


# ---- self-test ----------------------------------------------------------------------------


def self_test():
    # Expert sizes: docs/model.md's cases (MoDSE paper, HMoE paper).
    assert expert_hidden_sizes("modse", 8, 320) == [576, 64, 512, 128, 384, 256, 320, 320]
    assert expert_hidden_sizes("modse", 8, 3840) == [6912, 768, 6144, 1536, 4608, 3072, 3840, 3840]
    assert expert_hidden_sizes("arithmetic", 8, 1536) == [864, 1056, 1248, 1440, 1632, 1824, 2016, 2208]
    s16 = expert_hidden_sizes("modse", 16, 160)
    assert sum(s16) == 16 * 160 and all(s16[2 * i] + s16[2 * i + 1] == 320 for i in range(8)), s16

    # Placement: the C++ unit tests (tests/parallel/parallel_unit_test.cpp) ...
    assert place_contiguous(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    load = [100, 90, 10, 10, 5, 5, 2, 1]
    bal = place_balanced(load, 4)
    assert max_rank_load(bal, load, 4) == 101.0
    assert max_rank_load(bal, load, 4) < max_rank_load(place_contiguous(8, 4), load, 4)
    assert place_experts("balanced", [8] * 8, 4, load) == bal
    for e in (4, 8, 16):
        sizes = expert_hidden_sizes("modse", e, 160)
        for ep in (1, 2, 4):
            if e % ep or (e // ep) % 2:
                continue
            owner = place_pairs(sizes, ep)
            params = [0] * ep
            for i, o in enumerate(owner):
                params[o] += 3 * 64 * sizes[i]
            assert len(set(params)) == 1 and all(owner.count(r) == e // ep for r in range(ep))
    # ... and owner maps printed by the C++ place_experts for the same inputs
    # (a driver linked against parallel/placement.cpp; docs/scaling.md).
    assert bal == [0, 1, 2, 3, 2, 3, 1, 0], bal
    assert place_experts("pairs", [576, 64, 512, 128, 384, 256, 320, 320], 2) == [0, 0, 1, 1, 0, 0, 1, 1]
    hm = expert_hidden_sizes("arithmetic", 8, 320)
    assert place_experts("pairs", hm, 2) == [0, 1, 0, 1, 1, 0, 1, 0], place_experts("pairs", hm, 2)
    assert place_experts("pairs", hm, 8) == [7, 6, 5, 4, 3, 2, 1, 0]  # E/ep odd: balanced on sizes
    assert place_experts("balanced", [576, 64, 512, 128, 384, 256, 320, 320], 4,
                         [10, 40, 10, 30, 12, 20, 15, 15]) == [0, 0, 1, 2, 1, 2, 3, 3]
    assert place_experts("balanced", hm, 4) == [0, 1, 2, 3, 3, 2, 1, 0]  # no statistics: load = h_e
    assert place_experts("balanced", [320] * 8, 2, [5, 5, 5, 5, 5, 5, 5, 5]) == [0, 1, 0, 1, 0, 1, 0, 1]

    # Re-placement: a candidate adopted only for a gain of at least 5 %; on a
    # tie between the two searches, the one from the current map.
    rep, cand = decide_replacement([0, 0, 1, 1], [10, 10, 1, 1], [8, 8, 8, 8], 2)
    assert rep and cand == [1, 0, 0, 1], (rep, cand)  # 160 -> 88
    # Per-layer cost: two layers hot on different experts (C++ unit test
    # Replacement.CostIsPerLayerAndSwapsFindTheBetterMap).
    layers = [[100, 100, 10, 10], [10, 10, 100, 100]]
    assert layered_max_load([0, 0, 1, 1], layers, 2) == 400.0
    rep, cand = decide_replacement([0, 0, 1, 1], layers, [1, 1, 1, 1], 2)
    assert rep and layered_max_load(cand, layers, 2) == 220.0, (rep, cand)
    rep, cand = decide_replacement([0, 1, 0, 1], [10, 9, 10, 10], [8, 8, 8, 8], 2)
    assert not rep  # 160 vs the candidate's 160 (or 152): below the 5 % gain

    # The byte formula on a hand case: d = 4, 2 bytes, 10 tokens, k = 2,
    # ep = 4: 20 rows, 15 of them remote on average, 4 transfers of 8 bytes.
    assert ep_bytes_per_rank(10, 2, 4, 4, 2) == 4 * 15 * 4 * 2 == 480
    assert ep_bytes_per_rank(10, 2, 1, 4, 2) == 0

    class A:  # machine: one node of 2 GPUs, 1 GB/s NVLink, 0.5 GB/s IB, no efficiency loss
        act_bytes, gpus_per_node, nvlink_gbs, ib_gbs, comm_eff = 2, 2, 1.0, 0.5, 1.0
    # ep = 4 over 2 nodes, shares 0.4 0.2 0.2 0.2, 1e6 tokens, k = 1, d = 500 (1000-byte rows):
    # rank 0 receives 0.4e6 rows from its node peer (NVLink: 0.4 s) and from
    # 2 remote ranks (IB: 0.8e9 B / 0.5e9 = 1.6 s); rank 1 sends 0.4e6 rows to
    # rank 0 over NVLink and 0.4e6 over IB (0.8 s) ...: the transfer takes 1.6 s.
    t, recv = alltoall_time(np.array([0.4, 0.2, 0.2, 0.2]), 1e6, 1, 500, A)
    assert abs(t - 1.6) < 1e-9 and abs(recv - 1.2e6) < 1e-3, (t, recv)
    print("scaling.py self-test: OK")
    return 0


# ---- main -----------------------------------------------------------------------------------


def main():
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    ap.add_argument("--self-test", action="store_true", help="check the ports and formulas, exit")
    ap.add_argument("--place", help="print the owner map of METHOD (contiguous|pairs|balanced) and exit")
    ap.add_argument("--sizes", help="with --place: comma-separated expert hidden sizes")
    ap.add_argument("--tokens", help="with --place balanced: comma-separated tokens per expert")
    ap.add_argument("--ep", type=int, default=1, help="with --place: the number of EP ranks")
    ap.add_argument("--run", action="append", default=[], help="a motley run directory (repeatable)")
    ap.add_argument("--check-bytes", action="append", metavar="RUN:PREFIX",
                    help="compare the MPI_Alltoallv bytes counted in PREFIX.<rank> with the formulas")
    ap.add_argument("--elem-bytes", type=int, default=4,
                    help="with --check-bytes: bytes per exchanged element (motley's CPU path: float32)")
    ap.add_argument("--out", help="write the markdown tables here (default: stdout)")
    ap.add_argument("--json", help="write every projected number here")
    ap.add_argument("--early", help="early window LO:HI in steps (none: (5%%, 20%%] of the run)")
    ap.add_argument("--late", help="late window LO:HI (none: the last 20%%)")
    ap.add_argument("--gpus", default="8,16,32,64,128,256,512", help="GPU counts to project")
    g = ap.add_argument_group("target model (expert layout from the run, scaled)")
    g.add_argument("--d-model", type=int, default=4096, help="target d_model")
    g.add_argument("--n-layers", type=int, default=32, help="target layers")
    g.add_argument("--n-heads", type=int, default=32, help="target heads (reported only)")
    g.add_argument("--vocab", type=int, default=32000, help="target vocabulary")
    g.add_argument("--seq-len", type=int, default=4096, help="target sequence length")
    g.add_argument("--size-multiple", type=int, default=128, help="target model.moe.size_multiple")
    g = ap.add_argument_group("layout and batch")
    g.add_argument("--pp", type=int, default=4, help="pipeline stages (world = pp x dp)")
    g.add_argument("--ep-list", help="EP sizes to project, e.g. 4,8,E (none: E/4, E/2, E, min(E, 8))")
    g.add_argument("--breakdown-ep", type=int, default=0, help="ep of the breakdown table (0: E/2)")
    g.add_argument("--micro-batches", type=int, default=16, help="micro-batches per dp rank and step")
    g.add_argument("--micro-batch-seqs", type=int, default=1, help="sequences per micro-batch")
    g.add_argument("--replace-every", type=int, default=100,
                   help="parallel.replace_every of the re-placement replay (0: never)")
    g.add_argument("--replace-min-gain", type=float, default=0.05,
                   help="the re-placement's minimum gain (kReplaceMinGain)")
    g = ap.add_argument_group("machine")
    g.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU (H100 SXM bf16 dense)")
    g.add_argument("--flop-eff", type=float, default=0.5, help="achieved fraction of peak in GEMMs")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs joined by NVLink")
    g.add_argument("--nvlink-gbs", type=float, default=450.0, help="GB/s per GPU and direction")
    g.add_argument("--ib-gbs", type=float, default=50.0, help="GB/s per GPU and direction (400 Gb/s)")
    g.add_argument("--comm-eff", type=float, default=0.7, help="achieved fraction of link bandwidth")
    g.add_argument("--act-bytes", type=int, default=2, help="bytes per activation element (bf16)")
    g.add_argument("--grad-bytes", type=int, default=4, help="bytes per all-reduced gradient element")
    g.add_argument("--ar-overlap", type=float, default=0.0,
                   help="fraction of the gradient all-reduce hidden behind backward")
    g.add_argument("--bytes-per-param", type=float, default=16.0,
                   help="weights + grads + AdamW state per parameter (bf16 + bf16 + 3 x fp32)")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    if args.check_bytes:
        for spec in args.check_bytes:
            run_dir, prefix = spec.split(":", 1)
            check_bytes(run_dir, prefix, args.elem_bytes)
        return 0
    if args.place:
        sizes = [int(x) for x in args.sizes.split(",")]
        tokens = [float(x) for x in args.tokens.split(",")] if args.tokens else None
        print(" ".join(str(o) for o in place_experts(args.place, sizes, args.ep, tokens)))
        return 0
    if not args.run:
        ap.error("give --run DIR (or --self-test)")
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
