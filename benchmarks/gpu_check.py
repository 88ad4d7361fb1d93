"""CUDA checks and the GPU k-means benchmark, as one short script for a machine with a GPU.

    python benchmarks/gpu_check.py            # exits non-zero if a check fails

The test suite runs on CPU only (CI has no GPU), so what needs CUDA lives here:
1. k-means on CUDA is deterministic and matches the CPU's quality;
2. fuse() with device="cuda" gives the same kind of model as on the CPU, and ratio 1 stays exact;
3. the issue's GPU target: the RoBERTa-base-shaped problem (12 x 3072 x 1537, k=768) timed.
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
