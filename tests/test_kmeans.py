"""Tests for hf_mlpfusion.core.kmeans: correctness, edge cases, determinism, memory bound."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import hf_mlpfusion.core._kmeans_kernels as K
import hf_mlpfusion.core.kmeans as km
from hf_mlpfusion.core.kmeans import KMeansResult, kmeans


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the unseeded torch.randn data below is the same on every run


def _inertia64(x, labels, centers):
    x64 = x.double()
    return ((x64 - centers.double()[labels]) ** 2).sum()


def _blobs(n_per, k, dim, spread, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * spread
    truth = torch.arange(k).repeat_interleave(n_per)
    x = centres[truth] + noise * torch.randn(k * n_per, dim, generator=g)
    perm = torch.randperm(k * n_per, generator=g)
    return x[perm], truth[perm]


# ------------------------------------------------------------------------------ against sklearn
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,dim,k", [(120, 8, 30), (200, 33, 50), (90, 5, 7)])
def test_not_worse_than_sklearn(n, dim, k, seed):
    sklearn = pytest.importorskip("sklearn.cluster")
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, dim, generator=g) * torch.rand(dim, generator=g)  # anisotropic
    res = kmeans(x, k, seed=seed, n_init=10)  # same number of restarts as the reference
    ref = sklearn.KMeans(n_clusters=k, n_init=10, algorithm="lloyd", random_state=seed)
    ref.fit(x.double().numpy())
    assert float(res.inertia) <= ref.inertia_ * (1 + 1e-6)


def test_minilm_shaped_beats_sklearn_n_init_1():
    sklearn = pytest.importorskip("sklearn.cluster")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 256, 65, generator=g) * 0.05  # 4 points per centroid, like ratio 0.25
    res = kmeans(x, 64)
    for b in range(2):
        ref = sklearn.KMeans(n_clusters=64, n_init=1, algorithm="lloyd", random_state=0)
        ref.fit(x[b].double().numpy())
        assert float(res.inertia[b]) < ref.inertia_


# ----------------------------------------------------------------------------- result contract
def test_result_contract_batched():
    x = torch.randn(3, 100, 12)
    res = kmeans(x, 20, device="cpu")
    assert isinstance(res, KMeansResult)
    assert res.labels.shape == (3, 100) and res.labels.dtype == torch.int64
    assert res.centers.shape == (3, 20, 12) and res.centers.dtype == torch.float32
    assert res.inertia.shape == (3,) and res.inertia.dtype == torch.float64
    for b in range(3):
        # the centres are the exact means of their points, the inertia is exact
        lab = res.labels[b]
        means = torch.stack([x[b][lab == j].double().mean(0) for j in range(20)])
        assert torch.equal(res.centers[b], means.float())
        assert torch.allclose(res.inertia[b], _inertia64(x[b], lab, res.centers[b]), rtol=1e-12)


def test_result_contract_single():
    x = torch.randn(50, 4, dtype=torch.float64)
    res = kmeans(x, 5, device=torch.device("cpu"))
    assert res.labels.shape == (50,)
    assert res.centers.shape == (5, 4) and res.centers.dtype == torch.float64
    assert res.inertia.dim() == 0 and res.inertia.dtype == torch.float64


def test_refinement_lowers_inertia():
    x = torch.randn(2, 400, 30)
    seeds = kmeans(x, 100, refine=False, n_init=1, max_iter=0)  # k-means++ alone
    lloyd = kmeans(x, 100, refine=False, n_init=1, max_iter=50)
    refined = kmeans(x, 100, refine=True, n_init=1)
    assert lloyd.n_iter > 1 and lloyd.n_moves == 0
    assert (lloyd.inertia < seeds.inertia).all()
    assert (refined.inertia < lloyd.inertia).all()
    assert refined.n_moves > 0


def test_refined_result_is_hartigan_optimal():
    """No single-point move may lower the exact inertia any more."""
    x = torch.randn(150, 6, dtype=torch.float64)
    k = 40
    res = kmeans(x, k, n_init=1)
    lab, c = res.labels, res.centers
    cnt = torch.bincount(lab, minlength=k).double()
    d = torch.cdist(x, c) ** 2
    own = d.gather(1, lab[:, None])[:, 0]
    out_gain = own * cnt[lab] / (cnt[lab] - 1).clamp(min=1)
    in_cost = d * (cnt / (cnt + 1))
    in_cost[torch.arange(150), lab] = float("inf")
    gain = torch.where(cnt[lab] > 1, out_gain - in_cost.min(1).values, torch.zeros(150))
    assert float(gain.max()) <= 1e-4 * float(own.mean())


# -------------------------------------------------------------------------------- edge cases
def test_exact_recovery_of_separated_clusters():
    x, truth = _blobs(n_per=6, k=12, dim=10, spread=10.0, noise=0.01, seed=3)
    res = kmeans(x, 12)
    # same partition: labels and truth determine each other
    pairs = set(zip(res.labels.tolist(), truth.tolist()))
    assert len(pairs) == 12
    for j in range(12):
        assert torch.allclose(res.centers[j], x[res.labels == j].mean(0))


@pytest.mark.parametrize("max_iter", [0, 10])
def test_duplicate_points(max_iter):
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(10, 5, generator=g)
    x = distinct.repeat(6, 1)  # 60 points, 10 distinct
    res = kmeans(x, 10, max_iter=max_iter)
    assert float(res.inertia) == 0.0
    assert torch.bincount(res.labels, minlength=10).min() >= 1
    assert torch.unique(res.centers, dim=0).shape[0] == 10  # no duplicate centroids


@pytest.mark.parametrize("max_iter", [0, 10])
def test_more_clusters_than_distinct_points(max_iter):
    x = torch.randn(4, 3).repeat(5, 1)  # 20 points, 4 distinct
    res = kmeans(x, 7, max_iter=max_iter)
    assert float(res.inertia) == 0.0
    assert torch.bincount(res.labels, minlength=7).min() >= 1
    assert torch.isfinite(res.centers).all()


def test_all_points_identical():
    x = torch.ones(30, 4)
    res = kmeans(x, 5)
    assert float(res.inertia) == 0.0 and torch.bincount(res.labels, minlength=5).min() >= 1
    assert torch.equal(res.centers, torch.ones(5, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_k_equals_n_is_exact(dtype):
    x = torch.randn(2, 25, 7).to(dtype)
    x[0, 3] = x[0, 4]  # a duplicate still gets its own centre
    res = kmeans(x, 25)
    assert torch.equal(res.labels, torch.arange(25).expand(2, 25))
    assert res.centers.dtype == dtype
    assert torch.equal(res.centers, x)  # bit-identical
    assert torch.equal(res.inertia, torch.zeros(2, dtype=torch.float64))


def test_singleton_centres_are_bit_identical():
    x = torch.randn(40, 9) * 1e3 + torch.randn(40, 9)
    res = kmeans(x, 35)
    cnt = torch.bincount(res.labels, minlength=35)
    for j in torch.nonzero(cnt == 1)[:, 0].tolist():
        assert torch.equal(res.centers[j], x[res.labels == j][0])


def test_k_equals_one():
    x = torch.randn(3, 50, 6, dtype=torch.float64)
    res = kmeans(x, 1)
    assert (res.labels == 0).all()
    assert torch.allclose(res.centers[:, 0], x.mean(1), rtol=0, atol=1e-12)
    assert torch.allclose(res.inertia, ((x - x.mean(1, keepdim=True)) ** 2).sum((1, 2)))


@pytest.mark.parametrize("max_iter", [0, 10])
@pytest.mark.parametrize("refine", [True, False])
def test_no_empty_clusters_no_nan(max_iter, refine):
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        # heavy-tailed data with a few outliers: a classic cause of empty clusters in Lloyd
        x = torch.randn(2, 80, 3, generator=g) ** 3
        res = kmeans(x, 40, seed=seed, n_init=3, max_iter=max_iter, refine=refine)
        assert torch.isfinite(res.centers).all() and torch.isfinite(res.inertia).all()
        for b in range(2):
            assert torch.bincount(res.labels[b], minlength=40).min() >= 1


def test_fill_empty_gives_every_cluster_a_point():
    labels = torch.tensor([[0, 0, 0, 1, 1, 0]])
    dist = torch.tensor([[1.0, 5.0, 2.0, 9.0, 0.5, 3.0]])
    out = km._fill_empty(labels, dist, 4)
    assert torch.bincount(out[0], minlength=4).min() >= 1
    # the farthest point (9.0) sits in a cluster of 2 and may move; points are taken far-first
    assert out[0, 3] != 1 and out[0, 1] != 0


# ----------------------------------------------------------------------- batching, determinism
@pytest.mark.parametrize("max_iter", [0, 10])
def test_single_problem_equals_batch_member(max_iter):
    x = torch.randn(4, 120, 17)
    batch = kmeans(x, 30, seed=5, max_iter=max_iter)
    for b in range(4):
        one = kmeans(x[b], 30, seed=5, max_iter=max_iter)
        assert torch.equal(one.labels, batch.labels[b])
        assert torch.equal(one.centers, batch.centers[b])
        assert torch.equal(one.inertia, batch.inertia[b])


def test_chunking_does_not_change_the_answer():
    x = torch.randn(5, 90, 11)
    whole = kmeans(x, 20, seed=1)
    chunked = kmeans(x, 20, seed=1, max_chunk_bytes=1)  # one problem per group
    assert torch.equal(whole.labels, chunked.labels)
    assert torch.equal(whole.inertia, chunked.inertia)


def test_deterministic_for_a_seed():
    x = torch.randn(3, 150, 20)
    a = kmeans(x, 40, seed=3, n_init=2)
    b = kmeans(x, 40, seed=3, n_init=2)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centers, b.centers)
    assert torch.equal(a.inertia, b.inertia)
    c = kmeans(x, 40, seed=4, n_init=2)
    assert not torch.equal(a.labels, c.labels)


def test_more_restarts_never_hurt():
    x = torch.randn(2, 160, 10)
    one = kmeans(x, 40, n_init=1, seed=0)
    three = kmeans(x, 40, n_init=3, seed=0)  # restart 0 is the same run as n_init=1
    assert (three.inertia <= one.inertia).all()


def test_thread_count_does_not_change_the_answer():
    x = torch.randn(5, 130, 9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kmeans(x, 33, seed=2, n_init=2)
        torch.set_num_threads(max(2, before))
        many = kmeans(x, 33, seed=2, n_init=2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.labels, many.labels) and torch.equal(one.centers, many.centers)
    assert torch.equal(one.inertia, many.inertia)


def test_other_dtypes_cluster_the_same_points():
    x = torch.randn(2, 80, 6).to(torch.bfloat16)
    res = kmeans(x, 20)
    ref = kmeans(x.float(), 20)  # bfloat16 is read exactly as float32
    assert res.centers.dtype == torch.bfloat16
    assert torch.equal(res.labels, ref.labels) and torch.equal(res.inertia, ref.inertia)
    assert torch.equal(res.centers, ref.centers.to(torch.bfloat16))


# ------------------------------------------------------------------ the Gram-space kernels
def _gram_of(x):
    """Exactly symmetric float32 Gram matrix of x [n, dim], as the solver builds it."""
    g = km._gram(x[None].float().contiguous())[0].numpy().copy()
    K.mirror_lower(g)
    return g


def _sums(g, labels, k):
    SX = np.empty((k, g.shape[0]))
    SS = np.empty(k)
    cnt = np.empty(k, np.int64)
    K.cluster_sums(g, labels, k, SX, SS, cnt)
    return SX, SS, cnt


@pytest.mark.parametrize("n", [50, 384, 1000])
def test_blocked_gram_is_symmetric_and_batch_independent(n, monkeypatch):
    monkeypatch.setattr(km, "_GRAM_BLOCK", 96)  # several blocks, uneven at n = 50 and 1000
    x = torch.randn(3, n, 17)
    gb = km._gram(x).numpy()
    for b in range(3):
        g = gb[b].copy()
        K.mirror_lower(g)
        assert np.array_equal(g, g.T)
        ref = x[b].double() @ x[b].double().T
        assert np.allclose(g, ref.numpy(), rtol=0, atol=1e-5 * float(ref.abs().max()))
        single = km._gram(x[b:b + 1]).numpy()[0]
        low = np.tril(np.ones((n, n), dtype=bool))
        assert np.array_equal(single[low], gb[b][low])


@pytest.mark.parametrize("n,dim,G", [(50, 17, 3), (1000, 33, 2), (777, 64, 1)])
@pytest.mark.parametrize("max_bytes", [1, 3 * 96 * 33 * 4, 1 << 40])
def test_panelled_gram_equals_the_gram_of_the_whole_centred_copy(n, dim, G, max_bytes, monkeypatch):
    monkeypatch.setattr(km, "_GRAM_BLOCK", 96)  # several blocks, uneven at n = 50, 777 and 1000
    x = (torch.randn(G, n, dim) * 3 + 1).numpy()
    means = np.empty((G, dim))
    centred = np.empty_like(x)
    for g in range(G):
        K.column_means(x[g], means[g])
        K.center_rows(x[g], means[g], centred[g])
    assert np.array_equal(centred, (x - means[:, None]).astype(np.float32))  # one rounding per entry
    whole = km._gram(torch.from_numpy(centred)).numpy()
    panelled = km._gram_centred(x, means, max_bytes).numpy()
    low = np.tril(np.ones((n, n), dtype=bool))
    for g in range(G):  # the lower triangle is what the solver reads (mirror_lower copies it up)
        assert np.array_equal(panelled[g][low], whole[g][low])


def test_panelled_centring_does_not_change_the_answer(monkeypatch):
    x = torch.randn(2, 1000, 40)  # three Gram blocks of ~333 rows
    whole = kmeans(x, 200, device="cpu", n_init=2, max_iter=2)
    monkeypatch.setattr(km, "_CENTRED_BYTES", 1)  # one block per panel
    panelled = kmeans(x, 200, device="cpu", n_init=2, max_iter=2)
    assert torch.equal(panelled.labels, whole.labels) and torch.equal(panelled.centers, whole.centers)
    assert torch.equal(panelled.inertia, whole.inertia)


def test_cluster_sums_are_the_gram_space_quantities():
    g_ = torch.Generator().manual_seed(4)
    x = torch.randn(90, 7, generator=g_, dtype=torch.float64)
    labels = torch.randint(0, 12, (90,), generator=g_)
    g = _gram_of(x)
    SX, SS, cnt = _sums(g, labels.numpy(), 12)
    xf = torch.from_numpy(x.float().numpy()).double()
    s = torch.zeros(12, 7, dtype=torch.float64).index_add_(0, labels, xf)
    assert np.array_equal(cnt, torch.bincount(labels, minlength=12).numpy())
    assert np.allclose(SX, (s @ xf.T).numpy(), rtol=1e-5, atol=1e-5)
    assert np.allclose(SS, (s * s).sum(1).numpy(), rtol=1e-5, atol=1e-5)


def test_kmeanspp_seeds_are_distinct_and_labels_are_the_nearest_seed():
    x = torch.randn(200, 5, dtype=torch.float64)
    g = _gram_of(x)
    rng = np.random.default_rng(0)
    k = 25
    labels = np.empty(200, np.int64)
    chosen = K.kmeanspp(g, k, 0.37, rng.random((k - 1, 2 + int(np.log(k)))), labels)
    assert chosen[0] == int(0.37 * 200)
    assert len(set(chosen.tolist())) == k
    d = torch.cdist(x, x[torch.from_numpy(chosen)]) ** 2
    assert np.array_equal(labels[chosen], np.arange(k))  # every seed is in its own cluster
    # nearest seed, up to float32 rounding of the Gram entries
    own = d.gather(1, torch.from_numpy(labels)[:, None])[:, 0]
    assert torch.all(own <= d.min(1).values + 1e-4)


def test_gram_space_lloyd_matches_a_direct_lloyd():
    g_ = torch.Generator().manual_seed(5)
    centres = torch.randn(8, 4, generator=g_, dtype=torch.float64) * 3
    x = centres[torch.randint(0, 8, (240,), generator=g_)] + torch.randn(240, 4, generator=g_, dtype=torch.float64)
    x = x - x.mean(0)
    g = _gram_of(x)
    k = 8
    labels = np.empty(240, np.int64)
    chosen = K.kmeanspp(g, k, 0.5, np.random.default_rng(1).random((k - 1, 4)), labels)
    SX, SS, cnt = _sums(g, labels, k)
    it = K.lloyd(g, k, chosen, labels, 100, 0.0, SX, SS, cnt)
    # the reference: plain float64 Lloyd from the same seeds until no label changes
    c = x[torch.from_numpy(chosen)]
    ref = torch.cdist(x, c).argmin(1)
    for _ in range(100):
        c = torch.stack([x[ref == j].mean(0) for j in range(k)])
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, ref):
            break
        ref = new
    assert 1 < it < 100
    assert np.array_equal(labels, ref.numpy())
    # the sums were kept current through the iterations
    SX2, SS2, cnt2 = _sums(g, labels, k)
    assert np.array_equal(cnt, cnt2) and np.allclose(SX, SX2, rtol=0, atol=1e-9)
    assert np.allclose(SS, SS2, rtol=0, atol=1e-8)


def _reference_hartigan(g, k, labels, rel_tol):
    """One point at a time, a full scan per point: what ``K.hartigan`` must reproduce exactly."""
    n = g.shape[0]
    labels = labels.copy()
    SX, SS, cnt = _sums(g, labels, k)
    diag = np.diag(g).astype(np.float64)
    moves = 0
    while True:
        moved = 0
        for j in range(n):
            a = int(labels[j])
            na = int(cnt[a])
            if na <= 1:
                continue
            gj = diag[j]
            out = (gj - 2.0 * SX[a, j] / na + SS[a] / (na * na)) * na / (na - 1.0)
            best, b = np.inf, -1
            for c in range(k):
                nc = int(cnt[c])
                v = nc / (nc + 1.0) * gj + -2.0 / (nc + 1.0) * SX[c, j] + SS[c] / (nc * (nc + 1.0))
                if c != a and v < best:
                    best, b = v, c
            if out - best > rel_tol * (gj + out):
                SS[a] += gj - 2.0 * SX[a, j]
                SS[b] += gj + 2.0 * SX[b, j]
                SX[a] -= g[j].astype(np.float64)
                SX[b] += g[j].astype(np.float64)
                cnt[a] -= 1
                cnt[b] += 1
                labels[j] = b
                moved += 1
        moves += moved
        if moved == 0:
            return labels, moves


def test_block_hartigan_is_exactly_the_one_point_at_a_time_sweep():
    g_ = torch.Generator().manual_seed(6)
    x = torch.randn(150, 6, generator=g_, dtype=torch.float64)  # 150 points: three blocks of 64
    x = x - x.mean(0)
    g = _gram_of(x)
    k = 20
    labels = (torch.arange(150) % k)[torch.randperm(150, generator=g_)].numpy().astype(np.int64)
    ref, ref_moves = _reference_hartigan(g, k, labels, km._REL_TOL)
    SX, SS, cnt = _sums(g, labels, k)
    got = labels.copy()
    moves = K.hartigan(g, k, got, km._REL_TOL, 10_000, SX, SS, cnt)
    assert ref_moves > 100  # moves inside blocks, so the in-block corrections are exercised
    assert moves == ref_moves and np.array_equal(got, ref)
    # and the sums it kept are those of the final labels
    SX2, SS2, cnt2 = _sums(g, got, k)
    assert np.array_equal(cnt, cnt2) and np.allclose(SX, SX2, rtol=0, atol=1e-9)


def test_exact_stats_cpu_kernel_matches_the_torch_finish():
    """The CPU kernel and the torch code used on other devices give the same centres/inertia."""
    x = torch.randn(2, 70, 5, dtype=torch.float64) * 10
    lab = torch.randint(0, 9, (2, 2, 70))
    lab[..., :9] = torch.arange(9)  # no empty cluster
    cen_t, ine_t = km._exact_stats_torch(x, lab, 9)
    for g in range(2):
        for r in range(2):
            cen = np.empty((9, 5))
            ine = K.exact_stats(x[g].numpy(), lab[g, r].numpy(), 9, cen)
            assert np.array_equal(cen, cen_t[g, r].numpy())  # same sums, same order
            assert ine == pytest.approx(float(ine_t[g, r]), rel=1e-12)


def test_kernels_compile_without_a_writable_cache(monkeypatch):
    real = K.njit

    def njit(*args, cache=False, **kw):
        if cache:  # what numba raises when no cache location can be written
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real(*args, **kw)

    monkeypatch.setattr(K, "njit", njit)

    @K._jit()
    def f(a):
        return a + 1

    assert f(1) == 2


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("k", [0, -1, 11, 2.0, True])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must"):
        kmeans(torch.randn(10, 3), k)


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4, 5), (0, 3), (2, 0, 3)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError):
        kmeans(torch.randn(shape), 1)


def test_bad_n_init_and_type():
    with pytest.raises(ValueError, match="n_init"):
        kmeans(torch.randn(10, 3), 2, n_init=0)
    with pytest.raises(ValueError, match="torch.Tensor"):
        kmeans([[1.0, 2.0]], 1)


def test_device_argument_forms():
    x = torch.randn(30, 4)
    ref = kmeans(x, 5, device="cpu")
    for dev in ("auto", torch.device("cpu")) if not torch.cuda.is_available() else ("cpu",):
        assert torch.equal(kmeans(x, 5, device=dev).labels, ref.labels)


# -------------------------------------------------------------------------------- memory bound
def test_problems_are_grouped_under_the_budget(monkeypatch):
    sizes = []
    real = km._solve_group

    def spy(xg, *args, **kwargs):
        sizes.append(xg.shape[0])
        return real(xg, *args, **kwargs)

    monkeypatch.setattr(km, "_solve_group", spy)
    per = km._bytes_per_problem(64, 8, 16, 2)
    kmeans(torch.randn(7, 64, 8), 16, n_init=2, max_chunk_bytes=3 * per)
    assert sizes == [3, 3, 1]


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    import hf_mlpfusion.core.kmeans as km
    B, n, dim, k = 6, 1024, 384, 256
    x = torch.randn(B, n, dim)
    km.kmeans(torch.randn(2, 64, 8), 16)  # warm up the allocator and the kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = km.kmeans(x, k, n_init=1, max_iter=5, max_chunk_bytes=int(sys.argv[1]))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_growth": after - before,
                      "per_problem": km._bytes_per_problem(n, dim, k, 1)}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB on Linux")
def test_peak_memory_is_bounded_by_the_budget():
    """Peak RSS growth stays within a few per-problem budgets when problems go one at a time.

    An n x k x dim intermediate would be 400 MB here, all six Gram matrices together 25 MB, all
    distance matrices together 6 MB: the bound is tight enough to catch either mistake.
    """
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, "1"], capture_output=True,
                         text=True, check=True, timeout=120)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["peak_growth"] < 2 * m["per_problem"] + (8 << 20), m


def test_cluster_means_in_row_blocks_equal_one_float64_sum(monkeypatch):
    """The CPU cluster sums convert a block of rows to float64 at a time: the same bits as one
    index_add_ over the whole float64 copy, for any block size and input dtype."""
    from hf_mlpfusion.core import kmeans as km

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 301, 37, generator=g) * torch.logspace(-3, 3, 37)
    labels = torch.randint(0, 17, (2, 301), generator=g)
    want = torch.zeros(2, 17, 37, dtype=torch.float64)
    for b in range(2):
        want[b].index_add_(0, labels[b], x[b].double())
    counts = torch.zeros(2, 17, dtype=torch.float64).scatter_add_(1, labels, torch.ones(2, 301, dtype=torch.float64))
    want = want / counts.clamp(min=1)[..., None]
    for rows in (1, 7, 300, 10_000):
        monkeypatch.setattr(km, "_SUM_BLOCK_BYTES", 8 * 37 * rows)
        assert torch.equal(km.cluster_means(x, labels, 17), want)
    assert torch.equal(km.cluster_means(x.bfloat16(), labels, 17), km.cluster_means(x.bfloat16().float(), labels, 17))


def test_metric_vectors_part_by_part_equal_the_concatenation():
    from hf_mlpfusion.core.metric import DataMetric, metric_vectors
    from hf_mlpfusion.core.mlp import MLPTensors

    g = torch.Generator().manual_seed(4)
    B, p, d = 2, 40, 6
    for biased, m in ((True, 1), (False, 2)):  # a linear pair with biases, a gated MLP without
        ins = tuple(torch.randn(B, p, d, generator=g) for _ in range(m))
        bs = tuple((torch.randn(B, p, generator=g) if biased else None) for _ in range(m))
        mlp = MLPTensors(ins, bs, torch.randn(B, d, p, generator=g), kind="gated" if m == 2 else "linear")
        e = d + int(biased)
        a = torch.randn(B, e, e, generator=g, dtype=torch.float64)
        met = DataMetric(torch.linalg.cholesky(a @ a.transpose(1, 2) + torch.eye(e, dtype=torch.float64)),
                         torch.rand(B, m, generator=g) + 0.5, torch.rand(B, generator=g) + 0.5)
        parts = []
        for j, (w, b) in enumerate(zip(mlp.ins, mlp.in_biases)):
            rows = w.double() if b is None else torch.cat([w, b.unsqueeze(-1)], dim=-1).double()
            parts.append((rows @ met.chol) * met.in_scales[:, j].double()[:, None, None])
        parts.append(mlp.out.transpose(-1, -2).double() * met.out_scale.double()[:, None, None])
        assert torch.equal(metric_vectors(mlp, met), torch.cat(parts, dim=-1).float())
        assert torch.equal(metric_vectors(mlp.map(lambda t: t.bfloat16()), met),
                           metric_vectors(mlp.map(lambda t: t.bfloat16().float()), met))


_COLD_CACHE_SCRIPT = textwrap.dedent("""
    import json, torch
    from hf_mlpfusion.core import _kmeans_kernels as K, kmeans as km
    cold = K.cache_is_cold()
    km.kmeans(torch.randn(2, 200, 7, generator=torch.Generator().manual_seed(0)), 50, device="cpu")
    fns = (K.column_means, K.center_rows, K.mirror_lower, K.solve_run, K.exact_stats)
    print(json.dumps({"cold": cold, "misses": sum(sum(f.stats.cache_misses.values()) for f in fns),
                      "hits": [sum(f.stats.cache_hits.values()) for f in fns]}))
""")


def test_a_cold_kernel_cache_is_filled_by_a_child_process_not_by_compiling_here(tmp_path):
    # a first run compiles the kernels in a short-lived child (LLVM's memory never joins the compress's
    # peak); this process then loads every kernel it calls from the on-disk cache the child wrote
    env = {k: v for k, v in os.environ.items() if k != km.KERNELS_CHILD_ENV}
    out = subprocess.run([sys.executable, "-c", _COLD_CACHE_SCRIPT], capture_output=True, text=True, timeout=900,
                         env={**env, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["cold"] is True  # a fresh cache directory
    assert got["misses"] == 0 and all(h >= 1 for h in got["hits"])
