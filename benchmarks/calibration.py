"""What each calibration ingredient buys, on the real all-MiniLM-L6-v2.

    python benchmarks/calibration.py --layers 2-5 --variants free-uniform aware-uniform aware-token --steps 300
    python benchmarks/calibration.py --layers 2-5 --variants aware-token --steps 800

Variants: `free` = the paper's data-free clustering, `aware` = data-aware clustering (k-means in the
metric of the original MLP inputs, `hf_mlpfusion.core.metric.DataMetric`); `uniform` / `token` = the
calibration's token weighting. Each row: fuse (ratio 0.25), then refit + N distillation steps on
the built-in calibration split (up to 1024 samples, as `compress --calibration builtin` does), scored
on 400 samples of the disjoint held-out split: mean cosine of mean-pooled normalised embeddings to
the original's. This is what `mlpfusion compress --layers L --calibration builtin --distill-steps N`
does with `--data-free`/`--data-aware`. Results are appended to .bench_cache/calibration.jsonl.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from fidelity import CACHE, load_minilm, machine
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.calibrate import calibrate, data_metrics
from hf_mlpfusion.data import load_texts
from hf_mlpfusion.evaluate import evaluate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2-5")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--variants", nargs="+", default=["free-uniform", "aware-uniform", "aware-token"],
                    choices=["free-uniform", "free-token", "aware-uniform", "aware-token"])
    ap.add_argument("--steps", type=int, nargs="+", default=[300])
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_minilm()
    cal = load_texts(None, split="calibration", limit=args.samples)
    held = load_texts(None, split="heldout", limit=400)
    cfg = FusionConfig(ratio=args.ratio, layers=args.layers, seed=0, device="cpu")
    layers = cfg.resolve_layers(model.config.num_hidden_layers)
    rows = []
    for variant in args.variants:
        clustering, weighting = variant.split("-")
        for steps in args.steps:
            t0 = time.perf_counter()
            metrics = data_metrics(model, layers, cal, tok) if clustering == "aware" else None
            fused = fuse(model, cfg, metrics=metrics)
            free = evaluate(model, fused, held, tok, samples=400, ntk_examples=0, latency_repeats=0)
            calibrate(model, fused, cal, tok, refit=True, distill_steps=steps, weighting=weighting)
            rep = evaluate(model, fused, held, tok, samples=400, ntk_examples=0, latency_repeats=0)
            row = {"layers": args.layers, "ratio": args.ratio, "clustering": clustering, "weighting": weighting,
                   "distill_steps": steps, "samples": len(cal), "cosine_before_calibration": free.cosine_mean,
                   "cosine": rep.cosine_mean, "cosine_min": rep.cosine_min,
                   "hidden_error": rep.hidden_relative_error, "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(CACHE / "calibration.jsonl", "a") as fh:
                fh.write(json.dumps({**row, "machine": machine()}) + "\n")
    print(f"\nmachine: {machine()}\n")
    print("| layers | clustering | token weighting | distill steps | cosine, data-free stage | cosine, calibrated | "
          "min cosine | hidden rel. error | time (s) |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['clustering']} | {r['weighting']} | {r['distill_steps']} | "
              f"{r['cosine_before_calibration']:.3f} | {r['cosine']:.3f} | {r['cosine_min']:.3f} | "
              f"{r['hidden_error']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
