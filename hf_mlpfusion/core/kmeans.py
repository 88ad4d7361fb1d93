"""Batched k-means for MLP fusion: torch for the matrix product, compiled kernels for the rest.

The problem shape MLP fusion poses is unusual: many independent problems (one per layer), few
points per centroid (ratio 0.25 means 4), and high dimension (2d+1). Each problem is solved in
*Gram space*: after one matrix product ``G = X X^T`` (float32, on the compute device, by blocks
on and below the diagonal only), every distance the algorithm needs is an O(1) expression in
``G`` and float64 cluster sums, so nothing after the product costs O(n k dim):

1. **Greedy k-means++** (scikit-learn's variant: squared-distance weighting, ``2 + log k`` trial
   candidates per step, keep the one that lowers the potential most), distances from Gram rows.
2. Optional **Lloyd iterations** (``max_iter``, 0 by default), each O(n^2 + n k).
3. **Sequential Hartigan refinement** to convergence: points are visited in order and each moves
   at once to the cluster that lowers the inertia most, by exactly
   ``n_b/(n_b+1) |x-c_b|^2 - n_a/(n_a-1) |x-c_a|^2``. A move costs O(n) (two Gram rows added to
   the float64 sums); a sweep costs O(n k), done 64 points at a time so that it vectorises. A
   point never leaves a singleton cluster, so no cluster is ever empty.
4. Exact finish: centres as float64 means of the original points (a one-point cluster's centre
   is that point, bit for bit), inertia summed in float64; the best restart per problem is kept.

Steps 1-4 run in ``_kmeans_kernels`` (numba, compiled once and cached on disk), one run per
thread; each run reads only its own problem's Gram matrix and random numbers, so the answer is the
same for a seed whatever the batch, the grouping or the number of threads. On CUDA the Gram
matrices are computed on the GPU and the sequential part runs on the host, the same code.
Problems are processed in groups whose working memory stays under ``max_chunk_bytes``.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["kmeans", "cluster_means", "KMeansResult", "DEFAULT_N_INIT", "DEFAULT_MAX_ITER", "DEFAULT_TOL"]

#: Restarts per problem. With ~4 points per centroid the Hartigan refinement, not the restarts, is
#: what lowers the inertia: one refined run is already 6% below scikit-learn's n_init=30 on the
#: real MiniLM layers, and 2 or 4 restarts (which share the Gram matrix) gained 0.04% more for
#: 1.1x / 1.7x the time (docs/kmeans.md).
DEFAULT_N_INIT = 1
#: Lloyd iterations before the Hartigan refinement (which converges on its own). With moves at O(n)
#: each, Hartigan from the k-means++ seeds is as good as Lloyd first: on MiniLM, over 5 seeds, 0
#: and 10 iterations gave the same summed inertia within 0.01% (docs/kmeans.md), 0 is cheaper.
DEFAULT_MAX_ITER = 0
#: Lloyd stops early when the total squared centre shift is below ``tol`` times the mean per-feature
#: variance of the data (scikit-learn's definition).
DEFAULT_TOL = 1e-4
#: Default working-memory budget per group of problems, on the CPU.
DEFAULT_CPU_CHUNK_BYTES = 2 << 30
#: Rows per block of the Gram matrix (only blocks on and below the diagonal are computed): 384
#: was among the fastest of 256-1024 for n = 1536 and 3072 (docs/kmeans.md).
_GRAM_BLOCK = 384
#: On the CPU the centred rows the Gram products read are held a panel of blocks at a time, at most
#: this many bytes for the group (``_gram_centred``), not as a second copy of the whole input. A
#: Llama-shaped layer (n = 5632, dim = 6144: 138 MB centred) then holds 3 blocks (28 MB) and a scratch
#: block (9 MB); its Gram took the same time, 1.4-1.5 s, with one panel, 64 MiB or 32 MiB panels.
_CENTRED_BYTES = 32 << 20
#: A Hartigan move must gain more than this times (|x|^2 + the point's cost), well above float64
#: rounding of the sums and about the float32 rounding of the Gram entries.
_REL_TOL = 1e-7
#: Rows of the input converted to float64 at a time by the CPU cluster sums.
_SUM_BLOCK_BYTES = 32 << 20
#: Set in the child process that compiles the kernels (`_compile_kernels_apart`), and by users who want
#: them compiled in their own process ("0").
KERNELS_CHILD_ENV = "HF_MLPFUSION_COMPILE_KERNELS_APART"
_kernels_checked = False


@dataclass
class KMeansResult:
    """``labels`` int64 [B, n]; ``centers`` [B, k, dim]; ``inertia`` float64 [B].

    For a 2-D input the leading batch dimension is dropped (``inertia`` is then 0-dim).
    """

    labels: torch.Tensor
    centers: torch.Tensor
    inertia: torch.Tensor
    n_iter: int = 0  # Lloyd iterations run (max over problems and restarts)
    n_moves: int = 0  # Hartigan moves applied (summed over problems and restarts)


def _resolve_device(device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    n_init: int | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
    seed: int = 0,
    device="auto",
    refine: bool = True,
    max_chunk_bytes: int | None = None,
) -> KMeansResult:
    """Cluster each of the ``B`` problems in ``x`` ([B, n, dim], or [n, dim] for one) into ``k``.

    Args:
        n_init: restarts per problem, all run in one batch; the lowest inertia wins
            (default ``DEFAULT_N_INIT``).
        max_iter: maximum Lloyd iterations (default ``DEFAULT_MAX_ITER``); the Hartigan refinement
            runs until no single-point move lowers the inertia.
        tol: Lloyd's relative centre-shift tolerance (default ``DEFAULT_TOL``).
        seed: seeds a ``torch.Generator``. The same seed gives every problem the same random
            stream, so a problem's answer does not depend on the batch it is in.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1" or a ``torch.device``.
        refine: run the Hartigan refinement (default True).
        max_chunk_bytes: working-memory budget; problems are processed in groups that fit it
            (a single problem always runs, whatever its size). Default: 2 GiB on the CPU; on CUDA
            a quarter of the free memory, at most 2 GiB (the Gram matrices are also copied to the
            host, where the sequential part runs).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape [n, dim] or [B, n, dim], got {tuple(x.shape)}")
    single = x.dim() == 2
    xb = x.unsqueeze(0) if single else x
    B, n, dim = xb.shape
    if B == 0 or n == 0 or dim == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int with 1 <= k <= n = {n}, got {k!r}")
    n_init = DEFAULT_N_INIT if n_init is None else int(n_init)
    max_iter = DEFAULT_MAX_ITER if max_iter is None else int(max_iter)
    tol = DEFAULT_TOL if tol is None else float(tol)
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if not xb.is_floating_point() and xb.is_complex():
        raise ValueError("x must be real")
    dev = _resolve_device(device)
    out_dtype = xb.dtype if xb.is_floating_point() else torch.float32

    if k == n:  # every point is its own centre, exactly
        labels = torch.arange(n, device=dev).expand(B, n).clone()
        centers = xb.to(device=dev, dtype=out_dtype).clone()
        inertia = torch.zeros(B, dtype=torch.float64, device=dev)
        return _finish(KMeansResult(labels, centers, inertia), single)

    if max_chunk_bytes is None:
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            max_chunk_bytes = min(free // 4, DEFAULT_CPU_CHUNK_BYTES)
        else:
            max_chunk_bytes = DEFAULT_CPU_CHUNK_BYTES
    per_problem = _bytes_per_problem(n, dim, k, n_init)
    group = max(1, min(B, int(max_chunk_bytes // per_problem)))

    # The random stream is shared by all problems (see ``seed``): uniforms for the first centre
    # and for the k-means++ candidate draws. Restart r has its own stream, seeded from (seed, r),
    # so restart 0 of n_init=4 is the n_init=1 run and more restarts never do worse.
    n_trials = 2 + int(math.log(k))
    gen = torch.Generator(device=dev)
    u_first = torch.empty(n_init, device=dev, dtype=torch.float64)
    u_trials = torch.empty(max(k - 1, 0), n_init, n_trials, device=dev, dtype=torch.float64)
    for r in range(n_init):
        gen.manual_seed((int(seed) * 1_000_003 + r) % (2**63))
        u_first[r] = torch.rand((), generator=gen, device=dev, dtype=torch.float64)
        u_trials[:, r] = torch.rand(max(k - 1, 0), n_trials, generator=gen, device=dev,
                                    dtype=torch.float64)

    labels_out, centers_out, inertia_out = [], [], []
    n_iter_tot, n_moves_tot = 0, 0
    for s in range(0, B, group):
        lab, cen, ine, it, mv = _solve_group(xb[s:s + group], k, n_init, max_iter, tol, refine,
                                             u_first, u_trials, out_dtype, dev)
        labels_out.append(lab)
        centers_out.append(cen)
        inertia_out.append(ine)
        n_iter_tot = max(n_iter_tot, it)
        n_moves_tot += mv
    res = KMeansResult(torch.cat(labels_out), torch.cat(centers_out), torch.cat(inertia_out),
                       n_iter_tot, n_moves_tot)
    return _finish(res, single)


def cluster_means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Float64 means [B, k, dim] of the points x [B, n, dim] in each of the k clusters of labels [B, n]
    (deterministic on every device; an empty cluster's mean is 0)."""
    labels = labels.to(x.device)
    return _means64(x, labels.unsqueeze(1), k)[:, 0]


def _finish(res: KMeansResult, single: bool) -> KMeansResult:
    if single:
        res.labels, res.centers, res.inertia = res.labels[0], res.centers[0], res.inertia[0]
    return res


def _bytes_per_problem(n: int, dim: int, k: int, r: int) -> int:
    """Peak working memory of one problem in ``_solve_group``, in bytes (float32 = 4 bytes).

    x read as float64 (when it is not float32), its centred float32 rows (at most
    ``_CENTRED_BYTES`` of them for the group on the CPU, all of them on CUDA; counted whole here), the Gram matrix
    and a block of it, and per restart the float64 cluster sums ``[k, n]``, the float64 centres and a
    few length-n vectors.
    """
    floats = 3 * n * dim + n * n + _GRAM_BLOCK ** 2 + r * (2 * n * k + 2 * k * dim + 16 * n)
    return 4 * floats


# ------------------------------------------------------------------------------------- the solver
def _solve_group(x_orig, k, R, max_iter, tol, refine, u_first, u_trials, out_dtype, dev):
    """Cluster the G problems of ``x_orig`` [G, n, dim] with R restarts each.

    The data is centred (the Gram-space distances ``|x|^2 - 2 x.c + |c|^2`` then lose less to
    cancellation) and its Gram matrices computed on ``dev``; the sequential part (seeding, Lloyd,
    Hartigan) runs compiled on the CPU, one run per thread.
    """
    from . import _kmeans_kernels as K

    _compile_kernels_apart()
    G, n, dim = x_orig.shape
    P = G * R  # runs; run p is restart p % R of problem p // R
    on_cpu = dev.type == "cpu"
    if on_cpu:
        xo = x_orig.detach().cpu()
        # float32 holds bfloat16 / float16 exactly; anything else is read as float64
        xo = xo.float() if xo.dtype in (torch.float32, torch.bfloat16, torch.float16) else xo.double()
        x_np = xo.contiguous().numpy()
        means = np.empty((G, dim))
        _parallel(lambda g: K.column_means(x_np[g], means[g]), G)
        gram = _gram_centred(x_np, means)
    else:
        xo = x_orig.to(device=dev)
        xg = (xo.double() - xo.double().mean(1, keepdim=True)).float()
        gram = _gram(xg)
        del xg
    gram_np = gram.numpy() if on_cpu else gram.cpu().numpy()
    del gram
    _parallel(lambda g: K.mirror_lower(gram_np[g]), G)
    uf = u_first.cpu().numpy()
    ut = [np.ascontiguousarray(u_trials[:, r].cpu().numpy()) for r in range(R)]
    labels = np.empty((P, n), dtype=np.int64)
    max_sweeps = 4 * n + 100  # every sweep lowers the objective; the cap only guards the loop

    def run(p):
        g, r = divmod(p, R)
        return K.solve_run(gram_np[g], k, dim, float(uf[r]), ut[r], max_iter, float(tol), refine,
                           _REL_TOL, max_sweeps, labels[p])

    stats = _parallel(run, P)
    gram_np = None  # free the Gram matrices (the closure above holds the name)
    n_iter = max(s[0] for s in stats)
    n_moves = sum(s[1] for s in stats)
    lab = torch.from_numpy(labels).view(G, R, n)

    # exact float64 centres and inertia of every run, best restart per problem
    if on_cpu:
        cen64 = np.empty((G, R, k, dim))
        inertia_np = np.empty((G, R))

        def stat(p):
            g, r = divmod(p, R)
            inertia_np[g, r] = K.exact_stats(x_np[g], labels[p], k, cen64[g, r])

        _parallel(stat, P)
        cen64 = torch.from_numpy(cen64)
        inertia = torch.from_numpy(inertia_np)
    else:
        lab = lab.to(dev)
        cen64, inertia = _exact_stats_torch(xo.double(), lab, k)
    if R == 1:  # no copy of the float64 centres to pick the only restart
        return lab[:, 0].clone(), cen64[:, 0].to(out_dtype), inertia[:, 0].clone(), n_iter, n_moves
    best = inertia.argmin(1)  # first minimum: deterministic
    g = torch.arange(G, device=inertia.device)
    return (lab[g, best].clone(), cen64[g, best].to(out_dtype), inertia[g, best].clone(),
            n_iter, n_moves)


def _compile_kernels_apart() -> None:
    """Once per process: when the kernels' on-disk cache is cold (a first run, a new version), compile them
    in a short-lived child process, which fills the cache this process then loads them from. The compiler
    (LLVM) then never runs here: on a 3 GB Llama-shaped compress it added 0.09 GB to the peak, at the
    first layer's k-means. Anything that goes wrong leaves it to the usual compile on first call."""
    global _kernels_checked
    if _kernels_checked:
        return
    _kernels_checked = True
    if os.environ.get(KERNELS_CHILD_ENV, "1") == "0":
        return
    from . import _kmeans_kernels as K

    if not K.cache_is_cold():
        return
    package_root = str(Path(__file__).resolve().parents[2])  # this very copy of the package, in the child too
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    code = ("import torch; from hf_mlpfusion.core.kmeans import kmeans; "
            "kmeans(torch.arange(96.0).reshape(1, 32, 3).sin(), 8, device='cpu')")
    try:
        subprocess.run([sys.executable, "-c", code], env={**os.environ, KERNELS_CHILD_ENV: "0", "PYTHONPATH": path},
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=900, check=False)
    except (OSError, subprocess.SubprocessError):
        pass


def _exact_stats_torch(x64, lab, k):
    """Float64 centres [G, R, k, dim] and inertia [G, R] of x64 [G, n, dim] for labels [G, R, n],
    in torch on x64's device (deterministic there); ``_kmeans_kernels.exact_stats`` is the CPU
    version."""
    G, R, n = lab.shape
    dim = x64.shape[-1]
    cen64 = _means64(x64, lab, k)
    inertia = torch.empty(G, R, dtype=torch.float64, device=x64.device)
    for r in range(R):
        assigned = torch.gather(cen64[:, r], 1, lab[:, r, :, None].expand(G, n, dim))
        for g in range(G):  # one problem at a time: torch splits a sum over the whole batch across threads
            # differently for another batch size, and the inertia's last bits would depend on the batch
            inertia[g, r] = ((x64[g] - assigned[g]) ** 2).sum()
    return cen64, inertia


def _parallel(fn, count):
    """``[fn(i) for i in range(count)]`` on up to ``torch.get_num_threads()`` threads (the compiled
    kernels release the GIL). Each call writes only its own outputs, so the results do not depend
    on the number of threads or their timing."""
    workers = max(1, min(count, torch.get_num_threads()))
    if workers == 1:
        return [fn(i) for i in range(count)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, range(count)))


def _gram_edges(n):
    """Row boundaries of the Gram blocks: ~``_GRAM_BLOCK`` rows each, depending only on n."""
    nb = max(1, round(n / _GRAM_BLOCK))
    return [n * i // nb for i in range(nb + 1)]


def _gram(x):
    """Gram matrices [G, n, n] of x [G, n, dim] (on x's device); only the lower triangle is valid.

    Computed by blocks of ~``_GRAM_BLOCK`` rows, only the blocks on and below the diagonal: 5/8 of
    the products of one ``x x^T`` for four blocks (n = 1536), 9/16 for eight (n = 3072); then
    ``_kmeans_kernels.mirror_lower``
    then makes each matrix exactly symmetric. Block boundaries depend only on n, so a problem gets
    the same matrix in any batch.
    """
    G, n, dim = x.shape
    edges = _gram_edges(n)
    nb = len(edges) - 1
    if nb == 1:
        return torch.bmm(x, x.transpose(1, 2))
    out = torch.empty(G, n, n, dtype=x.dtype, device=x.device)
    for bi in range(nb):
        i0, i1 = edges[bi], edges[bi + 1]
        for bj in range(bi + 1):
            j0, j1 = edges[bj], edges[bj + 1]
            out[:, i0:i1, j0:j1] = torch.bmm(x[:, i0:i1], x[:, j0:j1].transpose(1, 2))
    return out


def _gram_centred(x_np, means, max_bytes=None):
    """``_gram`` of the centred float32 rows ``x_np - means`` (x_np [G, n, dim], means float64 [G, dim]),
    bit for bit, without a centred copy of the whole group: the rows are centred a panel of Gram blocks
    at a time (at most ``max_bytes``, default ``_CENTRED_BYTES``, or one block), and the blocks left of
    a panel once more, one at a time, into a scratch block. Each block product is the one ``_gram``
    computes, on the same float32 values (``_kmeans_kernels.center_rows`` rounds each entry once)."""
    from . import _kmeans_kernels as K

    G, n, dim = x_np.shape
    edges = _gram_edges(n)
    nb = len(edges) - 1
    row_bytes = 4 * G * dim
    budget = _CENTRED_BYTES if max_bytes is None else max_bytes
    per_panel = max(1, min(nb, budget // max(1, row_bytes * max(edges[i + 1] - edges[i] for i in range(nb)))))

    def centred(r0, r1, out=None):
        out = np.empty((G, r1 - r0, dim), dtype=np.float32) if out is None else out[:, : r1 - r0]
        _parallel(lambda g: K.center_rows(x_np[g, r0:r1], means[g], out[g]), G)
        return torch.from_numpy(out)

    if per_panel >= nb:  # the whole group fits: one centred copy, as ``_gram`` takes it
        return _gram(centred(0, n))
    out = torch.empty(G, n, n, dtype=torch.float32)
    scratch = np.empty((G, max(edges[i + 1] - edges[i] for i in range(nb)), dim), dtype=np.float32)
    for p0 in range(0, nb, per_panel):
        p1 = min(nb, p0 + per_panel)
        r0 = edges[p0]
        panel = centred(r0, edges[p1])
        for bj in range(p1):
            j0, j1 = edges[bj], edges[bj + 1]
            xj = panel[:, j0 - r0 : j1 - r0] if bj >= p0 else centred(j0, j1, scratch)
            for bi in range(max(bj, p0), p1):
                i0, i1 = edges[bi], edges[bi + 1]
                out[:, i0:i1, j0:j1] = torch.bmm(panel[:, i0 - r0 : i1 - r0], xj.transpose(1, 2))
        del panel
    return out


def _fill_empty(labels, dist, k):
    """Give every empty cluster the farthest point of a cluster that has more than one point
    (labels [P, n], dist [P, n] each point's distance to its centre; returns new labels)."""
    from . import _kmeans_kernels as K

    out = labels.cpu().numpy().astype(np.int64, copy=True)
    d = dist.cpu().double().numpy()
    for p in range(out.shape[0]):
        K.fill_empty(out[p], d[p], k)
    return torch.from_numpy(out).to(labels.device)


def _means64(x64, labels, k):
    """Float64 centres [G, R, k, dim] of x64 [G, n, dim] (any float dtype) for labels [G, R, n]."""
    sums = _sums64(x64, labels, k)
    G, R, n = labels.shape
    counts = torch.zeros(G, R, k, dtype=torch.float64, device=x64.device)
    counts.scatter_add_(2, labels, torch.ones_like(labels, dtype=torch.float64))
    return sums / counts.clamp(min=1)[..., None]


def _sums64(x, labels, k):
    """Per-cluster float64 sums [G, R, k, dim]; deterministic on every device."""
    G, R, n = labels.shape
    dim = x.shape[-1]
    out = torch.zeros(G, R, k, dim, dtype=torch.float64, device=x.device)
    if x.device.type == "cpu":
        # a block of rows at a time in float64 (no float64 copy of the whole input); index_add_ adds the
        # rows in order, so the sums are the ones of one call on all rows (tests/test_kmeans.py)
        step = max(1, _SUM_BLOCK_BYTES // (8 * max(dim, 1)))
        for g in range(G):
            for s in range(0, n, step):
                xg = x[g, s : s + step].double()
                for r in range(R):
                    out[g, r].index_add_(0, labels[g, r, s : s + step], xg)
    else:  # one-hot matmul: no atomics, so the same sums every time
        for g in range(G):
            onehot = torch.zeros(R, k, n, dtype=torch.float64, device=x.device)
            onehot.scatter_(1, labels[g][:, None, :], 1.0)
            out[g] = torch.matmul(onehot, x[g].double())
    return out
