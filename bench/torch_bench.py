#!/usr/bin/python3
"""The model of SPEC section 1 in plain PyTorch, timed like `motley bench`.

    bench/torch_bench.py --config configs/bench.json [--set key=value]...
                         [--device cpu|cuda] [--dtype f32|bf16] [--compile]
                         [--steps N] [--warmup N] [--threads N]
                         [--moe-tokens N] [--moe-reps N] [--peak-tflops X]
    bench/torch_bench.py --check      (float64: same parameters -> same loss and
                                       gradients as tests/layers/fixtures/make_fixtures.py)

Reads a motley config (same keys, defaults and `--set` rules as motley) and
builds the same model: embedding; per layer RMSNorm -> causal multi-head
attention with rotate-half RoPE -> residual, RMSNorm -> SwiGLU FFN or MoE ->
residual; final RMSNorm, untied LM head, cross-entropy plus the MoE
auxiliary losses. It is written as a PyTorch user would write it for speed:
nn.Module parameters, fused q/k/v and w1/w3 weights (one GEMM each instead
of two or three; same parameter count), F.scaled_dot_product_attention
(is_causal=True) where the installed PyTorch has it, dropless MoE dispatch
by sorting the (token, expert) pairs by expert and running every expert
once on its contiguous rows (index_select, index_add), torch.optim.AdamW
(fused or foreach where available) and clip_grad_norm_.

Output follows `motley bench`: the measured GEMM rate of a 1024^3 matmul on
the same device and dtype, the MoE-layer table (uniform, modse, arithmetic
sizes; forward + backward of one MoE layer on --moe-tokens rows, each
repetition next to a GEMM), and the median training step with tokens/s,
model GFLOP/s and MFU counted exactly as motley counts them: per token
6 x (non-embedding parameters with only the experts each token used) plus
12 L T d for attention.

Supported: routers linear, noisy (noise from torch's RNG, not motley's
Philox stream) and gru (all gru_state modes); selection topk and topp (with
max_k); renormalize; expert sizes uniform / modse / arithmetic / list
(motley's rounding, ported from layers/expert_sizes.cpp); every /
first_dense; the four auxiliary losses; micro-batches. Not supported:
capacity_factor > 0 (token dropping) and parallel layouts (one process).
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scaling  # noqa: E402  (bench/scaling.py: the expert-size rounding)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# ---- config (same keys, defaults and override rules as core/config.cpp) ----------------

DEFAULTS = {
    "model": {
        "vocab_size": 4096, "d_model": 256, "n_layers": 4, "n_heads": 4, "max_seq_len": 1024,
        "rope_theta": 10000.0, "norm_eps": 1e-5, "ffn_hidden": 640,
        "moe": {
            "n_experts": 8, "top_k": 2, "expert_hidden": 640, "expert_sizes": "uniform",
            "size_multiple": 8, "router": "linear", "gru_dim": 128, "gru_state": "recurrent",
            "selection": "topk", "top_p": 0.6, "max_k": 0, "renormalize": True,
            "capacity_factor": 0.0, "every": 1, "first_dense": 0,
            "aux": {"balance": 0.01, "size_penalty": 0.0, "z_loss": 0.0, "entropy": 0.0},
        },
    },
    "train": {
        "batch_size": 16, "micro_batches": 1, "seq_len": 128, "steps": 1000, "lr": 1e-3,
        "min_lr": 1e-4, "warmup": 100, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
        "eps": 1e-8, "grad_clip": 1.0, "seed": 1337, "log_every": 10, "eval_every": 200,
        "ckpt_every": 500, "keep_last": 3,
    },
    "parallel": {"dp": 1, "ep": 1, "pp": 1, "placement": "contiguous", "replace_every": 100},
    "data": {"train": "", "valid": "", "tokenizer": ""},
}


class ConfigError(Exception):
    pass


def _type_name(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, float):
        return "a real number"
    return "an integer"


def _coerce(key, default, value):
    """The value as the type of the default, with motley's rules."""
    if key == "model.moe.expert_sizes":
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return [_coerce(key + "[]", 0, v) for v in value]
        raise ConfigError(f"config key '{key}' must be \"uniform\", \"modse\", \"arithmetic\" "
                          f"or a list of integers, got {_type_name(value)}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value == int(value):
            return int(value)
        expected = "an integer"
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        expected = "a number"
    else:
        if isinstance(value, str):
            return value
        expected = "a string"
    raise ConfigError(f"config key '{key}' must be {expected}, got {_type_name(value)} "
                      f"({json.dumps(value)})")


def _apply(cfg, defaults, obj, prefix):
    if not isinstance(obj, dict):
        raise ConfigError(f"config key '{prefix}' must be a JSON object")
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in defaults:
            raise ConfigError(f"unknown config key '{key}'")
        if isinstance(defaults[k], dict):
            _apply(cfg[k], defaults[k], v, key)
        else:
            cfg[k] = _coerce(key, defaults[k], v)


def _override(cfg, text):
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"--set '{text}' must have the form key=value, e.g. train.lr=3e-4")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value  # not JSON: a string
    node, dnode = cfg, DEFAULTS
    parts = key.split(".")
    for p in parts[:-1]:
        if p not in dnode or not isinstance(dnode[p], dict):
            raise ConfigError(f"--set: unknown config key '{key}'")
        node, dnode = node[p], dnode[p]
    leaf = parts[-1]
    if leaf not in dnode or isinstance(dnode[leaf], dict):
        raise ConfigError(f"--set: unknown config key '{key}'")
    node[leaf] = _coerce(key, dnode[leaf], parsed)


def load_config(path, overrides=()):
    cfg = json.loads(json.dumps(DEFAULTS))
    if path:
        with open(path) as f:
            _apply(cfg, DEFAULTS, json.load(f), "")
    for o in overrides:
        _override(cfg, o)
    validate(cfg)
    return cfg


def validate(cfg):
    m, e, t = cfg["model"], cfg["model"]["moe"], cfg["train"]

    def req(ok, key, why):
        if not ok:
            raise ConfigError(f"config key '{key}': {why}")

    req(m["d_model"] % m["n_heads"] == 0, "model.n_heads", "must divide model.d_model")
    req((m["d_model"] // m["n_heads"]) % 2 == 0, "model.n_heads",
        "the head size d_model / n_heads must be even for RoPE")
    req(e["n_experts"] >= 0, "model.moe.n_experts", "must be >= 0")
    if e["n_experts"] > 0:
        req(1 <= e["top_k"] <= e["n_experts"], "model.moe.top_k", "must be in [1, n_experts]")
        if isinstance(e["expert_sizes"], list):
            req(len(e["expert_sizes"]) == e["n_experts"], "model.moe.expert_sizes",
                "must list n_experts sizes")
        else:
            req(e["expert_sizes"] in ("uniform", "modse", "arithmetic"),
                "model.moe.expert_sizes", "must be uniform, modse, arithmetic or a list")
        req(e["router"] in ("linear", "noisy", "gru"), "model.moe.router",
            "must be linear, noisy or gru")
        req(e["gru_state"] in ("recurrent", "detached", "none"), "model.moe.gru_state",
            "must be recurrent, detached or none")
        req(e["selection"] in ("topk", "topp"), "model.moe.selection", "must be topk or topp")
        req(0 < e["top_p"] <= 1, "model.moe.top_p", "must be in (0, 1]")
        req(0 <= e["max_k"] <= e["n_experts"], "model.moe.max_k", "must be in [0, n_experts]")
        req(e["every"] >= 1, "model.moe.every", "must be positive")
        req(e["capacity_factor"] == 0, "model.moe.capacity_factor",
            "token dropping (> 0) is not implemented in this PyTorch bench")
    req(t["batch_size"] % t["micro_batches"] == 0, "train.batch_size",
        "must be a multiple of train.micro_batches")
    req(1 <= t["seq_len"] <= m["max_seq_len"], "train.seq_len",
        "must be in [1, model.max_seq_len]")


def is_moe_layer(moe, layer):
    if moe["n_experts"] == 0 or layer < moe["first_dense"]:
        return False
    return layer % moe["every"] == moe["every"] - 1


# ---- expert sizes (layers/expert_sizes.cpp) ------------------------------------------
# The rounding itself is bench/scaling.py's port; here only the config
# checks, with the error messages motley gives.


def expert_hidden_sizes(moe, scheme=None):
    e = moe["n_experts"]
    scheme = moe["expert_sizes"] if scheme is None else scheme
    if e == 0:
        return []
    if isinstance(scheme, list):
        return list(scheme)
    if scheme == "modse" and e % 2:
        raise ConfigError(f"model.moe.expert_sizes = modse needs an even n_experts, got {e}")
    if scheme not in ("uniform", "modse", "arithmetic"):
        raise ConfigError(f"unknown model.moe.expert_sizes '{scheme}'")
    total, multiple = e * moe["expert_hidden"], moe["size_multiple"]
    if scheme != "uniform":
        if total % multiple:
            raise ConfigError(f"n_experts * expert_hidden = {total} must be a multiple of "
                              f"model.moe.size_multiple = {multiple}")
        if total // multiple < e:
            raise ConfigError(f"cannot give {e} experts at least {multiple} hidden units each "
                              f"from a total of {total}")
    return scaling.expert_hidden_sizes(scheme, e, moe["expert_hidden"], multiple)


# ---- the model ---------------------------------------------------------------------------
# torch is imported after the thread settings (see main), so the model code
# lives in a function that receives the module.


def define_model(torch):
    nn = torch.nn
    F = torch.nn.functional
    has_sdpa = hasattr(F, "scaled_dot_product_attention")
    if hasattr(torch, "compiler") and hasattr(torch.compiler, "disable"):
        no_compile = torch.compiler.disable
    elif hasattr(torch, "_dynamo"):
        no_compile = torch._dynamo.disable
    else:
        def no_compile(fn):
            return fn

    def low_precision(t):
        return t.dtype in (torch.bfloat16, torch.float16)

    class RMSNorm(nn.Module):
        def __init__(self, d, eps):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def rope(x, cos, sin):
        # x (B, H, T, hd); rotate-half pairs (i, i + hd/2).
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Attention(nn.Module):
        def __init__(self, d, n_heads):
            super().__init__()
            self.h, self.hd = n_heads, d // n_heads
            self.wqkv = nn.Parameter(torch.empty(3 * d, d))  # rows: Wq, Wk, Wv
            self.wo = nn.Parameter(torch.empty(d, d))

        def forward(self, x, cos, sin, mask):
            b, t, d = x.shape
            qkv = F.linear(x, self.wqkv).view(b, t, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            q = rope(q, cos, sin).to(v.dtype)
            k = rope(k, cos, sin).to(v.dtype)
            if has_sdpa:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                # Older PyTorch: scale and causal mask in one baddbmm (mask: 0 / -inf).
                s = torch.baddbmm(mask.to(q.dtype), q.reshape(b * self.h, t, self.hd),
                                  k.reshape(b * self.h, t, self.hd).transpose(1, 2),
                                  beta=1.0, alpha=1.0 / math.sqrt(self.hd))
                o = torch.bmm(torch.softmax(s, dim=-1), v.reshape(b * self.h, t, self.hd))
                o = o.view(b, self.h, t, self.hd)
            return F.linear(o.transpose(1, 2).reshape(b, t, d), self.wo)

    class SwiGLU(nn.Module):
        """y = W2 (silu(W1 x) * (W3 x)), W1 and W3 stored as one (2h, d) weight."""

        def __init__(self, d, h):
            super().__init__()
            self.h = h
            self.w13 = nn.Parameter(torch.empty(2 * h, d))  # rows: W1, W3
            self.w2 = nn.Parameter(torch.empty(d, h))

        def forward(self, x):
            a, g = F.linear(x, self.w13).split(self.h, dim=-1)
            return F.linear(F.silu(a) * g, self.w2)

    class MoE(nn.Module):
        def __init__(self, d, moe, sizes, router=None):
            super().__init__()
            self.moe = moe
            self.e = moe["n_experts"]
            self.d = d
            self.sizes = list(sizes)
            self.router_kind = moe["router"] if router is None else router
            if self.router_kind == "gru":
                self.proj = nn.Parameter(torch.empty(moe["gru_dim"], d))
                self.gate = nn.Parameter(torch.empty(self.e, moe["gru_dim"]))
            else:
                self.router = nn.Parameter(torch.empty(self.e, d))
                if self.router_kind == "noisy":
                    self.noise = nn.Parameter(torch.empty(self.e, d))
            self.experts = nn.ModuleList(SwiGLU(d, h) for h in self.sizes)
            self.register_buffer("expert_params", torch.tensor([3.0 * d * h for h in self.sizes],
                                                               dtype=torch.float64),
                                 persistent=False)

        def forward(self, m, gru=None, state=None):
            """m (N, d) -> (out (N, d), aux loss, new GRU state, stats dict)."""
            n = m.shape[0]
            moe, e = self.moe, self.e
            new_state = None
            if self.router_kind == "gru":
                if state is None or moe["gru_state"] == "none":
                    prev = torch.zeros(n, moe["gru_dim"], dtype=m.dtype, device=m.device)
                elif moe["gru_state"] == "detached":
                    prev = state.detach()
                else:
                    prev = state
                new_state = gru(F.linear(m, self.proj), prev)
                logits = F.linear(new_state, self.gate)
            else:
                logits = F.linear(m, self.router)
                if self.router_kind == "noisy" and self.training:
                    logits = logits + torch.randn_like(logits) * F.softplus(
                        F.linear(m, self.noise))
            if low_precision(logits):
                logits = logits.float()
            probs = torch.softmax(logits, dim=-1)
            # Descending, ties to the lower expert index (stable sort).
            vals, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
            if moe["selection"] == "topk":
                k = moe["top_k"]
                vals, idx = vals[:, :k], idx[:, :k]
                gates = vals / vals.sum(-1, keepdim=True) if moe["renormalize"] else vals
                expert_ids = idx.reshape(-1)
                token_ids = torch.arange(n, device=m.device).repeat_interleave(k)
                pair_gates = gates.reshape(-1)
            else:
                max_k = moe["max_k"] or e
                vals, idx = vals[:, :max_k], idx[:, :max_k]
                # Expert j is in when the mass before it is still below top_p.
                before = vals.detach().cumsum(-1) - vals.detach()
                sel = before < moe["top_p"]
                gates = vals * sel
                if moe["renormalize"]:
                    gates = gates / gates.sum(-1, keepdim=True)
                expert_ids = idx[sel]
                token_ids = torch.arange(n, device=m.device)[:, None].expand_as(idx)[sel]
                pair_gates = gates[sel]
            out, counts = self.dispatch(m, expert_ids, token_ids, pair_gates)
            aux = self.aux_losses(logits, probs, counts, n)
            stats = {"counts": counts,
                     "active": float(sum(c * 3.0 * self.d * h
                                         for c, h in zip(counts, self.sizes))) / n}
            return out, aux, new_state, stats

        @no_compile
        def dispatch(self, m, expert_ids, token_ids, pair_gates):
            """Dropless: sort pairs by expert, one SwiGLU per expert on its rows."""
            order = torch.sort(expert_ids, stable=True).indices
            tok = token_ids.index_select(0, order)
            gate = pair_gates.index_select(0, order)
            counts = torch.bincount(expert_ids, minlength=self.e).tolist()
            xs = m.index_select(0, tok)
            ys, start = [], 0
            for ex, c in zip(self.experts, counts):
                if c:
                    ys.append(ex(xs[start:start + c]))
                start += c
            y = torch.cat(ys) if len(ys) > 1 else ys[0]
            y = y * gate[:, None]
            out = torch.zeros_like(m).index_add_(0, tok, y.to(m.dtype))
            return out, counts

        def aux_losses(self, logits, probs, counts, n):
            a, e = self.moe["aux"], self.e
            aux = torch.zeros((), dtype=probs.dtype, device=probs.device)
            if a["balance"] or a["size_penalty"]:
                f = torch.tensor(counts, dtype=probs.dtype, device=probs.device) / n
                big_p = probs.mean(0)
                if a["balance"]:
                    aux = aux + a["balance"] * e * (f * big_p).sum()
                if a["size_penalty"]:
                    h = torch.tensor(self.sizes, dtype=probs.dtype, device=probs.device)
                    aux = aux + a["size_penalty"] * e * (f * (h / h.mean()) * big_p).sum()
            if a["z_loss"]:
                aux = aux + a["z_loss"] * (torch.logsumexp(logits, -1) ** 2).mean()
            if a["entropy"]:
                logp = torch.log_softmax(logits, -1)
                aux = aux + a["entropy"] * (-(probs * logp).sum(-1)).mean()
            return aux

    class Block(nn.Module):
        def __init__(self, mc, layer, sizes):
            super().__init__()
            d = mc["d_model"]
            self.attn_norm = RMSNorm(d, mc["norm_eps"])
            self.attn = Attention(d, mc["n_heads"])
            self.ffn_norm = RMSNorm(d, mc["norm_eps"])
            self.is_moe = is_moe_layer(mc["moe"], layer)
            if self.is_moe:
                self.moe = MoE(d, mc["moe"], sizes)
            else:
                self.ffn = SwiGLU(d, mc["ffn_hidden"])

    class Model(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            mc = cfg["model"]
            self.mc = mc
            d, v = mc["d_model"], mc["vocab_size"]
            self.sizes = expert_hidden_sizes(mc["moe"])
            self.embed = nn.Parameter(torch.empty(v, d))
            self.layers = nn.ModuleList(Block(mc, l, self.sizes) for l in range(mc["n_layers"]))
            self.final_norm = RMSNorm(d, mc["norm_eps"])
            self.lm_head = nn.Parameter(torch.empty(v, d))
            moe = mc["moe"]
            self.gru = None
            if moe["n_experts"] and moe["router"] == "gru":
                self.gru = nn.GRUCell(moe["gru_dim"], moe["gru_dim"], bias=True)
            # RoPE tables in float64 (cast with the model), positions 0..max_seq_len-1.
            hd = d // mc["n_heads"]
            inv_freq = mc["rope_theta"] ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
            ang = torch.arange(mc["max_seq_len"], dtype=torch.float64)[:, None] * inv_freq[None, :]
            self.register_buffer("cos", torch.cos(ang), persistent=False)
            self.register_buffer("sin", torch.sin(ang), persistent=False)
            t = mc["max_seq_len"]
            self.register_buffer("mask", torch.full((t, t), float("-inf"),
                                                    dtype=torch.float64).triu(1),
                                 persistent=False)

        def init_weights(self, seed):
            """SPEC init: matrices N(0, 0.02), Wo and W2 N(0, 0.02/sqrt(2L)), gains 1,
            GRU as PyTorch's GRUCell; drawn from torch's generator, not motley's Philox."""
            g = torch.Generator().manual_seed(seed)
            small = 0.02 / math.sqrt(2.0 * self.mc["n_layers"])
            for name, p in self.named_parameters():
                if name.startswith("gru."):
                    bound = 1.0 / math.sqrt(self.mc["moe"]["gru_dim"])
                    w = torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 * bound - bound
                elif p.dim() == 1:
                    w = torch.ones(p.shape)
                else:
                    std = small if name.endswith(("attn.wo", "w2")) else 0.02
                    w = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
                with torch.no_grad():
                    p.copy_(w)

        def forward(self, tokens, targets):
            b, t = tokens.shape
            x = F.embedding(tokens, self.embed)
            cos, sin = self.cos[:t], self.sin[:t]
            mask = self.mask[:t, :t]
            aux = None
            state = None
            active = 0.0
            for blk in self.layers:
                x = x + blk.attn(blk.attn_norm(x), cos, sin, mask)
                h = blk.ffn_norm(x)
                if blk.is_moe:
                    out, a, new_state, stats = blk.moe(h.reshape(b * t, -1), self.gru, state)
                    if new_state is not None:
                        state = new_state
                    x = x + out.view(b, t, -1)
                    aux = a if aux is None else aux + a
                    active += stats["active"]
                else:
                    x = x + blk.ffn(h)
            logits = F.linear(self.final_norm(x), self.lm_head)
            logits = logits.view(b * t, -1)
            if low_precision(logits):
                logits = logits.float()
            lm = F.cross_entropy(logits, targets.reshape(-1))
            if aux is None:
                aux = torch.zeros((), dtype=lm.dtype, device=lm.device)
            return lm + aux, lm, aux, active

        # Parameters by SPEC name (fused weights split back), for --check.
        def load_spec_params(self, p):
            def cp(dst, src):
                with torch.no_grad():
                    dst.copy_(src)

            cp(self.embed, p["embed.weight"])
            cp(self.lm_head, p["lm_head.weight"])
            cp(self.final_norm.weight, p["final_norm.weight"])
            if self.gru is not None:
                for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    cp(getattr(self.gru, k), p["moe_gru." + k])
            for l, blk in enumerate(self.layers):
                pre = f"layers.{l}."
                cp(blk.attn_norm.weight, p[pre + "attn_norm.weight"])
                cp(blk.ffn_norm.weight, p[pre + "ffn_norm.weight"])
                cp(blk.attn.wqkv, torch.cat([p[pre + "attn." + w] for w in ("wq", "wk", "wv")]))
                cp(blk.attn.wo, p[pre + "attn.wo"])
                if blk.is_moe:
                    mo = blk.moe
                    if mo.router_kind == "gru":
                        cp(mo.proj, p[pre + "moe.router.proj"])
                        cp(mo.gate, p[pre + "moe.router.gate"])
                    else:
                        cp(mo.router, p[pre + "moe.router.weight"])
                    ffns = [(f"{pre}moe.experts.{k}.", ex) for k, ex in enumerate(mo.experts)]
                else:
                    ffns = [(pre + "ffn.", blk.ffn)]
                for q, f in ffns:
                    cp(f.w13, torch.cat([p[q + "w1"], p[q + "w3"]]))
                    cp(f.w2, p[q + "w2"])

        def spec_grads(self):
            g = {"embed.weight": self.embed.grad, "lm_head.weight": self.lm_head.grad,
                 "final_norm.weight": self.final_norm.weight.grad}
            if self.gru is not None:
                for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    g["moe_gru." + k] = getattr(self.gru, k).grad
            for l, blk in enumerate(self.layers):
                pre = f"layers.{l}."
                g[pre + "attn_norm.weight"] = blk.attn_norm.weight.grad
                g[pre + "ffn_norm.weight"] = blk.ffn_norm.weight.grad
                for w, gw in zip(("wq", "wk", "wv"), blk.attn.wqkv.grad.chunk(3)):
                    g[pre + "attn." + w] = gw
                g[pre + "attn.wo"] = blk.attn.wo.grad
                if blk.is_moe:
                    mo = blk.moe
                    if mo.router_kind == "gru":
                        g[pre + "moe.router.proj"] = mo.proj.grad
                        g[pre + "moe.router.gate"] = mo.gate.grad
                    else:
                        g[pre + "moe.router.weight"] = mo.router.grad
                    ffns = [(f"{pre}moe.experts.{k}.", ex) for k, ex in enumerate(mo.experts)]
                else:
                    ffns = [(pre + "ffn.", blk.ffn)]
                for q, f in ffns:
                    if f.w13.grad is None:
                        continue
                    g[q + "w1"], g[q + "w3"] = f.w13.grad.split(f.h)
                    g[q + "w2"] = f.w2.grad
            return g

    return Model, MoE, has_sdpa


def model_flops_per_step(cfg, model, active):
    """motley's count: tokens x (6 x (non-embedding params, experts as used) + 12 L T d)."""
    mc, tc = cfg["model"], cfg["train"]
    total = sum(p.numel() for p in model.parameters())
    dense = float(total - mc["vocab_size"] * mc["d_model"])
    for l in range(mc["n_layers"]):
        if is_moe_layer(mc["moe"], l):
            dense -= sum(3.0 * mc["d_model"] * h for h in model.sizes)
    tokens = tc["batch_size"] * tc["seq_len"]
    return tokens * (6.0 * (dense + active)
                     + 12.0 * mc["n_layers"] * tc["seq_len"] * mc["d_model"])


# ---- timing --------------------------------------------------------------------------------


def make_sync(torch, device):
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_gemm(torch, a, b, sync):
    sync()
    t0 = time.perf_counter()
    c = torch.matmul(a, b)
    sync()
    del c
    return time.perf_counter() - t0


def gemm_operands(torch, device, dtype, seed):
    n = 1024
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, n, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    b = (torch.rand(n, n, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    return a, b


def measured_peak(torch, device, dtype, sync):
    """Best of 4 1024^3 matmuls after one warm-up (motley: best of 4); on CUDA the
    mean of 20 back-to-back products (one is too short to time alone)."""
    n = 1024
    a, b = gemm_operands(torch, device, dtype, 0)
    time_gemm(torch, a, b, sync)
    if device.type == "cuda":
        best = 1e30
        for _ in range(5):
            sync()
            t0 = time.perf_counter()
            for _ in range(20):
                torch.matmul(a, b)
            sync()
            best = min(best, (time.perf_counter() - t0) / 20)
    else:
        best = min(time_gemm(torch, a, b, sync) for _ in range(4))
    return 2.0 * n ** 3 / best


def bench_moe_layer(torch, MoE, cfg, scheme, tokens, reps, device, amp, dtype, sync):
    """One MoE layer (linear router, as motley bench), forward + backward on
    `tokens` rows of N(0, 1); each repetition next to a 1024^3 GEMM."""
    mc = cfg["model"]
    moe = dict(mc["moe"])
    sizes = expert_hidden_sizes(moe, scheme)
    d = mc["d_model"]
    torch.manual_seed(1)
    layer = MoE(d, moe, sizes, router="linear")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    layer.to(device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, d, generator=g).to(device)
    ga, gb = gemm_operands(torch, device, dtype, 3)
    times, gemm_times, flops = [], [], 0.0
    for rep in range(reps + 1):
        gs = time_gemm(torch, ga, gb, sync)
        layer.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_(True)
        sync()
        t0 = time.perf_counter()
        with amp():
            out, aux, _, stats = layer(inp)
            loss = out.float().sum() + aux
        loss.backward()
        sync()
        s = time.perf_counter() - t0
        if rep > 0:
            times.append(s)
            gemm_times.append(gs)
        flops = 3.0 * sum(c * 6.0 * d * h for c, h in zip(stats["counts"], sizes))
    n = 1024
    return statistics.median(times), flops, 2.0 * n ** 3 / statistics.median(gemm_times), sizes


def make_optimizer(torch, model, tc, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=tc["lr"], betas=(tc["beta1"], tc["beta2"]), eps=tc["eps"])
    for extra, label in (({"fused": True}, "fused"), ({"foreach": True}, "foreach"), ({}, "for-loop")):
        try:
            opt = torch.optim.AdamW(groups, **kw, **extra)
            if extra.get("fused"):
                # Some versions accept fused=True and fail only at the first step.
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                opt.step()
                model.load_state_dict(state)
                opt = torch.optim.AdamW(groups, **kw, **extra)
                for p in model.parameters():
                    p.grad = None
            return opt, label
        except (TypeError, RuntimeError, ValueError):
            continue
    raise RuntimeError("cannot build torch.optim.AdamW")


def run_bench(args):
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    cfg = load_config(args.config, args.set)
    mc, tc = cfg["model"], cfg["train"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    Model, MoE, has_sdpa = define_model(torch)
    sync = make_sync(torch, device)
    lp = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.dtype == "bf16":
        def amp():
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    else:
        def amp():
            return contextlib.nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # f32 means f32, as motley
        torch.backends.cudnn.allow_tf32 = False

    print(f"PyTorch {torch.__version__} on {device.type}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}"
          f", {args.dtype}{' autocast, f32 master weights' if args.dtype == 'bf16' else ''}, "
          f"{torch.get_num_threads()} thread(s), attention: "
          f"{'scaled_dot_product_attention' if has_sdpa else 'baddbmm + softmax (no SDPA in this PyTorch)'}"
          f"{', torch.compile' if args.compile else ''}")
    rate = measured_peak(torch, device, lp, sync)
    label = "sgemm" if args.dtype == "f32" else "bf16 GEMM"
    print(f"{label} (1024^3 torch.matmul on {device.type}): {rate / 1e9:.1f} GFLOP/s")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else rate
    if args.peak_tflops:
        print(f"MFU against the given peak of {args.peak_tflops:.1f} TFLOP/s")

    moe = mc["moe"]
    if args.moe_tokens > 0 and moe["n_experts"] > 0:
        sel = f"top-{moe['top_k']}" if moe["selection"] == "topk" else "top-p"
        print(f"\nMoE layer forward + backward: d {mc['d_model']}, {moe['n_experts']} experts, "
              f"{args.moe_tokens} tokens, {sel}")
        print(f"  {'sizes':<11} {'ms':>10} {'GFLOP/s':>12} {label[:5] + ' GF/s':>12} "
              f"{'of ' + label[:5]:>10} expert sizes")
        uniform_s = 0.0
        for scheme in ("uniform", "modse", "arithmetic"):
            if scheme == "modse" and moe["n_experts"] % 2:
                continue
            s, flops, grate, sizes = bench_moe_layer(torch, MoE, cfg, scheme, args.moe_tokens,
                                                     args.moe_reps, device, amp, lp, sync)
            if scheme == "uniform":
                uniform_s = s
            print(f"  {scheme:<11} {s * 1e3:10.2f} {flops / s / 1e9:12.1f} {grate / 1e9:12.1f} "
                  f"{100.0 * flops / s / grate:9.0f}% {' '.join(map(str, sizes))}")
            if uniform_s > 0 and scheme != "uniform":
                print(f"  {'':<11} time relative to uniform: {s / uniform_s:.2f}")

    torch.manual_seed(tc["seed"])
    model = Model(cfg)
    model.init_weights(tc["seed"])
    model.to(device)
    model.train()
    opt, opt_kind = make_optimizer(torch, model, tc, device)
    fwd = model
    if args.compile:
        fwd = torch.compile(model)
    micro = tc["micro_batches"]
    per_micro = tc["batch_size"] // micro
    gen = torch.Generator(device=device)
    params = list(model.parameters())
    times, step_flops = [], 0.0
    warmup = args.warmup if args.warmup is not None else (3 if args.compile else 1)
    for step in range(warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        active = 0.0
        for mb in range(micro):
            gen.manual_seed(step * micro + mb)
            allt = torch.randint(0, mc["vocab_size"], (per_micro, tc["seq_len"] + 1),
                                 generator=gen, device=device)
            tokens, targets = allt[:, :-1], allt[:, 1:]
            with amp():
                loss, lm, aux, act = fwd(tokens, targets)
            (loss / micro).backward()
            active += act / micro
        if tc["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, tc["grad_clip"])
        else:
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                  for p in params if p.grad is not None]))
        opt.step()
        sync()
        s = time.perf_counter() - t0
        if step >= warmup:
            times.append(s)
        step_flops = model_flops_per_step(cfg, model, active)
    s = statistics.median(times)
    tokens = tc["batch_size"] * tc["seq_len"]
    total = sum(p.numel() for p in model.parameters())
    print(f"\ntraining step: {total} parameters, batch {tc['batch_size']} x {tc['seq_len']}, "
          f"{micro} micro-batches (AdamW {opt_kind}, {warmup} warm-up step(s), "
          f"last loss {loss.item():.4f})")
    print(f"  median step {s * 1e3:.1f} ms over {args.steps} steps | {tokens / s:.0f} tokens/s | "
          f"{step_flops / s / 1e9:.1f} GFLOP/s | MFU {100.0 * step_flops / s / peak:.1f}%")
    return 0


# ---- --check: the model against make_fixtures.py's float64 reference --------------------

CHECK_CASES = [
    # (name, moe overrides, model overrides, seed): make_fixtures.py's four cases, plus
    # sizes computed by the expert_sizes port, topp without max_k, first_dense and
    # every aux term.
    ("linear_topk", {"aux": {"balance": 0.01, "z_loss": 0.001}}, {}, 1),
    ("gru_topp", {"router": "gru", "selection": "topp", "max_k": 3,
                  "expert_sizes": [8, 16, 16, 24],
                  "aux": {"balance": 0.0, "size_penalty": 0.1, "entropy": 0.03}},
     {"n_layers": 3}, 2),
    ("gru_detached_topk", {"router": "gru", "gru_state": "detached"}, {"n_layers": 3}, 3),
    ("dense_mixed_top1", {"top_k": 1, "renormalize": False, "every": 2}, {"n_layers": 3}, 4),
    ("modse_topp_first_dense", {"expert_sizes": "modse", "selection": "topp", "top_p": 0.5,
                                "first_dense": 1,
                                "aux": {"balance": 0.02, "size_penalty": 0.05, "z_loss": 0.001,
                                        "entropy": 0.01}},
     {"n_layers": 3, "n_heads": 4}, 5),
    ("arithmetic_gru_none_top3", {"n_experts": 6, "top_k": 3, "expert_sizes": "arithmetic",
                                  "router": "gru", "gru_state": "none"},
     {"n_layers": 2}, 6),
]


def run_check(args):
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests", "layers", "fixtures"))
    import make_fixtures as ref  # sets the default dtype to float64

    torch.set_default_dtype(torch.float64)
    Model, _, _ = define_model(torch)
    failures = 0

    # The expert-size port against the values the C++ tests and motley bench print.
    size_cases = [
        ({"n_experts": 8, "expert_hidden": 640, "size_multiple": 8}, "modse",
         [1152, 128, 1024, 256, 768, 512, 640, 640]),
        ({"n_experts": 8, "expert_hidden": 640, "size_multiple": 8}, "arithmetic",
         [360, 440, 520, 600, 680, 760, 840, 920]),
        ({"n_experts": 8, "expert_hidden": 3840, "size_multiple": 8}, "modse",
         [6912, 768, 6144, 1536, 4608, 3072, 3840, 3840]),
    ]
    for moe, scheme, want in size_cases:
        got = expert_hidden_sizes(moe, scheme)
        ok = got == want
        failures += not ok
        print(f"sizes {scheme:<10} E={moe['n_experts']} h={moe['expert_hidden']}: "
              f"{' '.join(map(str, got))} {'ok' if ok else 'FAIL, want ' + str(want)}")
    arith = expert_hidden_sizes({"n_experts": 8, "expert_hidden": 1536, "size_multiple": 8},
                                "arithmetic")
    ok = arith[0] == 864 and arith[-1] == 2208 and sum(arith) == 8 * 1536
    failures += not ok
    print(f"sizes arithmetic E=8 h=1536: {' '.join(map(str, arith))} {'ok' if ok else 'FAIL'}")

    for name, moe_over, model_over, seed in CHECK_CASES:
        moe_over = json.loads(json.dumps(moe_over))
        sets = []

        def flat(prefix, obj):
            for k, v in obj.items():
                if isinstance(v, dict):
                    flat(prefix + k + ".", v)
                else:
                    sets.append(f"{prefix}{k}={json.dumps(v)}")

        base = {"model": {"vocab_size": 32, "d_model": 16, "n_layers": 2, "n_heads": 2,
                          "max_seq_len": 16, "ffn_hidden": 24,
                          "moe": {"n_experts": 4, "top_k": 2, "expert_hidden": 16,
                                  "expert_sizes": [24, 8, 16, 16], "gru_dim": 8,
                                  "aux": {"balance": 0.01, "size_penalty": 0.0, "z_loss": 0.0,
                                          "entropy": 0.0}}},
                "train": {"seq_len": 7, "batch_size": 3}}
        base["model"].update(model_over)
        aux = moe_over.pop("aux", {})
        base["model"]["moe"].update(moe_over)
        base["model"]["moe"]["aux"].update(aux)
        cfg = json.loads(json.dumps(DEFAULTS))
        _apply(cfg, DEFAULTS, base, "")
        validate(cfg)
        # The reference takes the sizes as a list.
        ref_cfg = {"model": json.loads(json.dumps(cfg["model"]))}
        ref_cfg["model"]["moe"]["expert_sizes"] = expert_hidden_sizes(cfg["model"]["moe"])
        gen = torch.Generator().manual_seed(seed)
        params = {}
        for pname, shape in ref.param_shapes(ref_cfg).items():
            if pname.endswith("norm.weight"):
                t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            else:
                t = 0.3 * torch.randn(shape, generator=gen)
            params[pname] = t.requires_grad_(True)
        cell = None
        if ref_cfg["model"]["moe"]["router"] == "gru":
            def cell(x, h, p=params):
                return torch._VF.gru_cell(x, h, p["moe_gru.weight_ih"], p["moe_gru.weight_hh"],
                                          p["moe_gru.bias_ih"], p["moe_gru.bias_hh"])
        b, t = 3, 7
        vocab = cfg["model"]["vocab_size"]
        tokens = torch.randint(0, vocab, (b, t), generator=gen)
        targets = torch.randint(0, vocab, (b, t), generator=gen)
        loss_r, lm_r, aux_r = ref.model_loss(params, ref_cfg, tokens, targets, cell)
        loss_r.backward()

        model = Model(cfg).to(torch.float64)
        model.load_spec_params({k: v.detach() for k, v in params.items()})
        model.train()
        loss, lm, aux, _ = model(tokens, targets)
        loss.backward()
        grads = model.spec_grads()
        dloss = max(abs(loss.item() - loss_r.item()), abs(lm.item() - lm_r.item()),
                    abs(aux.item() - aux_r.item()))
        worst, worst_name = 0.0, ""
        for k, p in params.items():
            g = grads.get(k)
            gr = p.grad if p.grad is not None else torch.zeros_like(p)
            if g is None:
                g = torch.zeros_like(p)
            rel = ((g - gr).abs().max() / gr.abs().max().clamp_min(1e-30)).item()
            if rel > worst:
                worst, worst_name = rel, k
        ok = dloss <= 1e-10 and worst <= 1e-8
        failures += not ok
        print(f"check {name:<26} loss {loss.item():.12f} (reference {loss_r.item():.12f}, "
              f"|diff| {dloss:.1e}); max grad rel diff {worst:.1e} ({worst_name}) "
              f"{'ok' if ok else 'FAIL'}")
    print("all checks passed" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(
        description="The motley model in PyTorch, timed like `motley bench` "
                    "(random tokens; no data needed). Prints medians.")
    ap.add_argument("--config", help="motley JSON config (e.g. configs/bench.json)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable; value parsed as JSON, else a string)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                    help="bf16: torch.autocast bf16 with f32 master weights")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model (MoE dispatch stays eager)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first (default 1, as motley; 3 with --compile)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads and OPENBLAS_NUM_THREADS (default 1: one motley "
                         "rank per core)")
    ap.add_argument("--moe-tokens", type=int, default=4096,
                    help="rows for the MoE layer benchmark (0 skips it)")
    ap.add_argument("--moe-reps", type=int, default=7,
                    help="timed repetitions per size scheme, each next to a 1024^3 GEMM")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="MFU against this peak (e.g. the GPU's dense bf16 TFLOP/s) instead of "
                         "the measured 1024^3 GEMM")
    ap.add_argument("--check", action="store_true",
                    help="float64: compare loss and gradients with make_fixtures.py's reference")
    args = ap.parse_args()
    # The BLAS (OpenBLAS on Debian's torch, as for motley) reads its thread count at load time.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        if args.check:
            return run_check(args)
        if not args.config:
            ap.error("--config is required (or --check)")
        if args.steps < 1 or args.moe_reps < 1:
            ap.error("--steps and --moe-reps must be >= 1")
        if args.compile:
            import torch
            if not hasattr(torch, "compile"):
                print(f"torch_bench.py: --compile needs PyTorch >= 2.0 (this is "
                      f"{torch.__version__})", file=sys.stderr)
                return 2
        if args.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                print("torch_bench.py: --device cuda but torch.cuda.is_available() is False",
                      file=sys.stderr)
                return 2
        return run_bench(args)
    except ConfigError as e:
        print(f"torch_bench.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
