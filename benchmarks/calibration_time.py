"""Time of `compress --calibration builtin` on the real all-MiniLM-L6-v2 (all 6 layers, ratio 0.25):
the statistics pass (data-aware clustering) and the calibration (refit) separately, median of runs.

    python benchmarks/calibration_time.py [--repeats 3] [--samples 1024] [--layers 0-5]
    python benchmarks/calibration_time.py --compress [--repeats 3]   # the whole compress, block by block vs in memory

`--compress` times `compress(..., calibration="builtin")` itself, the block-by-block path
(`streaming=True`) and the in-memory one (`streaming=False`) alternately in one run, each with the
seconds of its stages (statistics, k-means, calibration; the block-by-block path interleaves them).

Side-by-side with another checkout: `PYTHONPATH=/path/to/other python benchmarks/calibration_time.py`
imports the package found first on the path, so alternate the two in one session.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import transformers

import hf_mlpfusion
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.calibrate import calibrate, data_metrics
from hf_mlpfusion.compress import default_model_path
from hf_mlpfusion.text import load_calibration


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--layers", default=None, help="e.g. 0-5 (default: all)")
    ap.add_argument("--compress", action="store_true", help="time the whole compress, both paths alternately")
    args = ap.parse_args()
    if args.compress:
        return compare_compress(args)
    path = default_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = load_calibration("builtin", tokenizer=tok, limit=args.samples)
    cfg = FusionConfig(ratio=0.25, layers=args.layers, seed=0, device="cpu")
    layers = cfg.resolve_layers(model.config.num_hidden_layers)
    rows = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        metrics = data_metrics(model, layers, texts, tok)
        t1 = time.perf_counter()
        fused = fuse(model, cfg, metrics=metrics)
        t2 = time.perf_counter()
        report = calibrate(model, fused, texts, tok)
        t3 = time.perf_counter()
        rows.append((t1 - t0, t3 - t2))
    stats, cal = (statistics.median(r[i] for r in rows) for i in (0, 1))
    print(f"hf_mlpfusion from {os.path.dirname(hf_mlpfusion.__file__)}; {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; "
          f"{len(texts)} samples, {report['tokens']} tokens, layers {layers[0]}-{layers[-1]}")
    print("| runs | statistics (s) | calibrate (s) | total (s) |\n|---:|---:|---:|---:|")
    print(f"| {args.repeats} | {stats:.1f} | {cal:.1f} | {stats + cal:.1f} |")
    print("each run:", ", ".join(f"{a:.1f}+{b:.1f}" for a, b in rows))


def compare_compress(args) -> None:
    import tempfile

    from hf_mlpfusion.compress import compress

    cfg = FusionConfig(ratio=0.25, layers=args.layers, seed=0, device="cpu")
    runs: dict[str, list[dict]] = {"block by block": [], "in memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                t0 = time.perf_counter()
                res = compress(None, cfg, f"{tmp}/{r}-{name.replace(' ', '-')}", calibration="builtin",
                               calibration_samples=args.samples, streaming=name == "block by block")
                runs[name].append({**res.seconds, "total": time.perf_counter() - t0})
    print(f"hf_mlpfusion from {os.path.dirname(hf_mlpfusion.__file__)}; {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; "
          f"{args.samples} samples, all-MiniLM-L6-v2, ratio 0.25")
    print("| path | runs | total (median, s) | stages (median, s) | each run's total (s) |\n|---|---:|---:|---|---|")
    for name, rs in runs.items():
        stages = ", ".join(f"{k} {statistics.median(r[k] for r in rs):.1f}" for k in rs[0] if k != "total")
        print(f"| {name} | {len(rs)} | {statistics.median(r['total'] for r in rs):.1f} | {stages} | "
              f"{', '.join(format(r['total'], '.1f') for r in rs)} |")


if __name__ == "__main__":
    main()
