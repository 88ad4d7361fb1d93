"""Fidelity of every method, data-free and calibrated, on the real all-MiniLM-L6-v2.

    python benchmarks/fidelity.py                      # the full grid, prints a markdown table
    python benchmarks/fidelity.py --methods fusion prune --layers 0-5 --ratios 0.25 --distill 200

Grid: methods (fusion, cluster, prune, sketch) x layer sets (0-5, 2-5) x ratios (0.5, 0.25).
For each: the data-free fused model, then the same after the least-squares refit (and, with
--distill N, after refit + N distillation steps) on the built-in calibration split (256 samples),
scored on the disjoint built-in held-out split (400 samples): mean cosine of mean-pooled normalised
embeddings to the original's, and the relative error of the last hidden states.

Data-free fused models are cached under .bench_cache/fused/ (k-means is the slow part); results
are appended to .bench_cache/fidelity.jsonl.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / ".bench_cache"

from hf_mlpfusion import FusionConfig, fuse  # noqa: E402
from hf_mlpfusion.calibrate import calibrate  # noqa: E402
from hf_mlpfusion.compress import default_model_path  # noqa: E402
from hf_mlpfusion.data import load_texts  # noqa: E402
from hf_mlpfusion.evaluate import evaluate  # noqa: E402

CAL_SAMPLES, HELD_SAMPLES = 256, 400


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    path = default_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def code_fingerprint() -> str:
    """A hash of the package's code, so a cached fused model never outlives the code that made it
    (clustering, weight reading and writing, saving all live in the package)."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "hf_mlpfusion").rglob("*.py")):
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:10]


def fused_cached(model, method: str, layers: str, ratio: float, seed: int = 0):
    """The data-free fused model, from .bench_cache/fused/ when the same code built it before."""
    folder = CACHE / "fused" / f"{method}-{layers}-{ratio}-s{seed}-{code_fingerprint()}"
    cfg = FusionConfig(ratio=ratio, layers=layers, method=method, seed=seed, device="cpu")
    if (folder / "model.safetensors").exists():
        from hf_mlpfusion.evaluate import load_any

        return load_any(folder), 0.0
    t0 = time.perf_counter()
    fused = fuse(model, cfg)
    secs = time.perf_counter() - t0
    folder.mkdir(parents=True, exist_ok=True)
    fused.save_pretrained(folder)
    return fused, secs


def run(methods, layer_sets, ratios, distill: int, out, weighting: str = "token") -> list[dict]:
    model, tok = load_minilm()
    cal = load_texts(None, split="calibration", limit=CAL_SAMPLES)
    held = load_texts(None, split="heldout", limit=HELD_SAMPLES)
    rows = []
    for layers in layer_sets:
        for ratio in ratios:
            for method in methods:
                fused, fuse_s = fused_cached(model, method, layers, ratio)
                stages = [("data-free", None)] + [("refit", 0)] + ([(f"refit+distill{distill}", distill)] if distill else [])
                for stage, steps in stages:
                    t0 = time.perf_counter()
                    if stage == "refit":
                        calibrate(model, fused, cal, tok, refit=True, weighting=weighting)
                    elif steps:
                        calibrate(model, fused, cal, tok, refit=False, distill_steps=steps, weighting=weighting)
                    cal_s = time.perf_counter() - t0
                    rep = evaluate(model, fused, held, tok, samples=HELD_SAMPLES, ntk_examples=0, latency_repeats=0)
                    row = {"method": method, "layers": layers, "ratio": ratio, "stage": stage,
                           "cosine": rep.cosine_mean, "cosine_min": rep.cosine_min,
                           "hidden_error": rep.hidden_relative_error, "fuse_s": fuse_s, "calibrate_s": cal_s,
                           "params": rep.parameters_after, "machine": machine()}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    with open(out, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    return rows


def table(rows) -> str:
    lines = ["| layers | ratio | method | stage | mean cosine | min cosine | hidden rel. error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['ratio']} | {r['method']} | {r['stage']} | {r['cosine']:.3f} | "
                     f"{r['cosine_min']:.3f} | {r['hidden_error']:.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["fusion", "cluster", "prune", "sketch"])
    ap.add_argument("--layers", nargs="+", default=["0-5", "2-5"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.25])
    ap.add_argument("--distill", type=int, default=0, help="also refit + N distillation steps")
    ap.add_argument("--weighting", default="token", choices=["token", "uniform"],
                    help="calibration token weighting (the docs' first tables were made with uniform)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    CACHE.mkdir(exist_ok=True)
    rows = run(args.methods, args.layers, args.ratios, args.distill, CACHE / "fidelity.jsonl", args.weighting)
    print(f"\nmachine: {machine()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
