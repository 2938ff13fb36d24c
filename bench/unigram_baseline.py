#!/usr/bin/python3
"""Unigram baseline for an evaluation split, in motley's units.

    bench/unigram_baseline.py DATA_DIR      (holding train.h5, valid.h5, tokenizer.json)

Estimates token frequencies on train.h5 (add-one smoothing) and reports the
cross-entropy of valid.h5's predicted tokens under them: nats per token and
bits per byte (the bytes each token decodes to, from tokenizer.json), the
same quantities `motley eval` prints. Valid tokens are counted the way motley
eval counts them: the targets of consecutive windows of T + 1 tokens, which
for the unigram model is every token but the first (up to the last window).
"""
import json
import math
import sys

import h5py
import numpy as np


def token_bytes(tokenizer):
    vocab = tokenizer["vocab_size"]
    lengths = np.zeros(vocab, dtype=np.int64)
    lengths[:256] = 1
    for i, (a, b) in enumerate(tokenizer["merges"]):
        lengths[256 + i] = lengths[a] + lengths[b]
    lengths[tokenizer["eot"]] = 0
    return lengths


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = sys.argv[1]
    tokenizer = json.load(open(f"{d}/tokenizer.json"))
    vocab = tokenizer["vocab_size"]
    train = h5py.File(f"{d}/train.h5", "r")["tokens"][()].astype(np.int64)
    valid = h5py.File(f"{d}/valid.h5", "r")["tokens"][()].astype(np.int64)
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = valid[1:]
    nats = -logp[targets].sum()
    n_bytes = token_bytes(tokenizer)[targets].sum()
    print(f"unigram baseline on {d}/valid.h5: {len(targets)} tokens, {n_bytes} bytes")
    print(f"eval_loss {nats / len(targets):.4f}")
    print(f"eval_ppl {math.exp(nats / len(targets)):.2f}")
    print(f"eval_bpb {nats / math.log(2) / n_bytes:.4f}")


if __name__ == "__main__":
    main()
