"""The paper's Adam-NTK check on the real all-MiniLM-L6-v2: per-layer error of every method.

    python benchmarks/ntk.py [--layers 0-5] [--ratio 0.25] [--examples 16]

For each method (fusion, cluster, prune, sketch; data-free, no calibration) the fused layers'
relative Adam-NTK error ||K' - K||_F / ||K||_F, K = G sign(G)^T with G the per-example gradients of
<v, mean-pooled last hidden state> (v a fixed random unit vector) with respect to the layer's MLP
parameters, on held-out built-in text. The paper claims fusion keeps this kernel best.
Fused models are shared with benchmarks/fidelity.py's cache (.bench_cache/fused/).

With --isolated, each layer is fused ALONE (the other layers stay original) and its kernel is
measured in that model, so a layer's error is the method's own, not inherited from fused layers
below it.
"""
from __future__ import annotations

import argparse
import json

import torch

from fidelity import CACHE, fused_cached, load_minilm, machine
from hf_mlpfusion import FusionConfig, fuse, parse_layers
from hf_mlpfusion.calibrate import batches
from hf_mlpfusion.data import load_texts
from hf_mlpfusion.evaluate import ntk_errors

METHODS = ["fusion", "cluster", "prune", "sketch"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="0-5")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="output directions v")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--isolated", action="store_true", help="fuse one layer at a time (see above)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_minilm()
    texts = load_texts(None, split="heldout", limit=args.examples)
    examples = list(batches(texts, tok, max_length=128, batch_size=1, model=model))
    res = {}
    for method in METHODS:
        if args.isolated:
            res[method] = {}
            for i in parse_layers(args.layers):
                fused = fuse(model, FusionConfig(ratio=args.ratio, layers=[i], method=method, device="cpu"))
                per_seed = [ntk_errors(model, fused, examples, [i], seed=s)[i] for s in args.seeds]
                res[method][i] = sum(per_seed) / len(per_seed)
        else:
            fused, _ = fused_cached(model, method, args.layers, args.ratio)
            layers = fused.config.mlpfusion["layers"]
            per_seed = [ntk_errors(model, fused, examples, layers, seed=s) for s in args.seeds]
            res[method] = {i: sum(p[i] for p in per_seed) / len(per_seed) for i in layers}
        print(method, json.dumps(res[method]), flush=True)
    layers = list(res["fusion"])
    lines = [f"| layer | {' | '.join(METHODS)} | lowest |", "|---" * (len(METHODS) + 2) + "|"]
    wins = {m: 0 for m in METHODS}
    for i in layers:
        best = min(METHODS, key=lambda m: res[m][i])
        wins[best] += 1
        lines.append(f"| {i} | " + " | ".join(f"**{res[m][i]:.3f}**" if m == best else f"{res[m][i]:.3f}" for m in METHODS) + f" | {best} |")
    lines.append("| mean | " + " | ".join(f"{sum(res[m].values()) / len(layers):.3f}" for m in METHODS) + " | |")
    out = "\n".join(lines)
    mode = "each layer fused alone" if args.isolated else "all listed layers fused together"
    print(f"\nmachine: {machine()}; layers {args.layers} ({mode}), ratio {args.ratio}, {len(examples)} examples, "
          f"{len(args.seeds)} output directions\n\n{out}\n\nlowest on: {wins}")
    (CACHE / ("ntk_isolated.json" if args.isolated else "ntk.json")).write_text(json.dumps({m: {str(k): v for k, v in r.items()} for m, r in res.items()}))


if __name__ == "__main__":
    main()
