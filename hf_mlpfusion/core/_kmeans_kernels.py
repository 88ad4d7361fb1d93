"""Compiled (numba) kernels of ``hf_mlpfusion.core.kmeans``: the sequential part of one run.

Everything here works in *Gram space*: given the Gram matrix ``G = X X^T`` of one problem (float32,
exactly symmetric), a clustering is described by its labels, its counts ``n_c``, the float64
sums ``SX[c, j] = x_j . s_c = sum_{i in c} G[i, j]`` (``s_c`` the sum of the points of ``c``) and
``SS[c] = |s_c|^2``. Then

    |x_j - c_c|^2 = G[j, j] - 2 SX[c, j] / n_c + SS[c] / n_c^2,
    inertia       = sum_j G[j, j] - sum_c SS[c] / n_c,

and moving one point ``p`` from ``a`` to ``b`` costs two O(n) column updates
(``SX[a] -= G[p]``, ``SX[b] += G[p]``) and two O(1) updates of ``SS``. No step costs
O(n k dim): the only product with the data is the Gram matrix, computed once by the caller.

The sums are float64 (sums of float32 Gram entries, exact up to float64 rounding), so the objective
the refinement lowers is the same one at every step: no drift between incremental updates and a
recomputation, no cycling. Each run depends only on its own inputs: the answer for a problem does
not depend on which other problems, or threads, there are. Two reductions (``_potential``,
``_sqdist``) are compiled with ``reassoc`` so that they vectorise: their order is fixed by the
compiled code, so results stay the same from call to call on a machine.

These functions are compiled on first use and cached on disk (``cache=True``); they release the
GIL (``nogil=True``) so that independent runs go in parallel on Python threads.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_OPTS = dict(nogil=True, boundscheck=False)


def _jit(**flags):
    """``numba.njit`` with an on-disk cache where one can be written (next to this file, else the
    user's cache directory or ``NUMBA_CACHE_DIR``); without one, it compiles in every process."""
    def deco(fn):
        try:
            return njit(cache=True, **_OPTS, **flags)(fn)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            return njit(cache=False, **_OPTS, **flags)(fn)
    return deco


@_jit()
def kmeanspp(gram, k, u_first, u_trials, labels):
    """Greedy k-means++ (scikit-learn's variant) from the Gram matrix; writes the index of the
    nearest seed of every point into ``labels`` and returns the chosen points [k].

    ``u_first`` is one uniform in [0, 1), ``u_trials`` [k - 1, L] uniforms for the candidates
    (L = 2 + log k). Chosen points get weight 0 and are never chosen twice; when every unchosen
    point duplicates a chosen one (all weights 0), a candidate is drawn uniformly from the
    unchosen points.
    """
    n = gram.shape[0]
    L = u_trials.shape[1]
    diag = np.empty(n)
    for i in range(n):
        diag[i] = gram[i, i]
    chosen = np.empty(k, np.int64)
    taken = np.zeros(n, np.bool_)
    mind = np.empty(n)
    w = np.empty(n)
    cdf = np.empty(n)
    cand = np.empty(L, np.int64)

    first = min(int(u_first * n), n - 1)
    chosen[0] = first
    taken[first] = True
    for j in range(n):
        d = diag[j] + diag[first] - 2.0 * np.float64(gram[first, j])
        mind[j] = d if d > 0.0 else 0.0
        labels[j] = 0
    mind[first] = 0.0
    for t in range(1, k):
        total = 0.0
        last = -1
        for j in range(n):
            v = 0.0 if taken[j] else mind[j]
            w[j] = v
            total += v
            if v > 0.0:
                last = j
        if total <= 0.0:  # only duplicates of chosen points are left: draw uniformly
            total = 0.0
            for j in range(n):
                v = 0.0 if taken[j] else 1.0
                w[j] = v
                total += v
                if v > 0.0:
                    last = j
        acc = 0.0
        for j in range(n):
            acc += w[j]
            cdf[j] = acc
        for l in range(L):
            target = u_trials[t - 1, l] * total
            lo, hi = 0, n  # first j with cdf[j] > target
            while lo < hi:
                mid = (lo + hi) >> 1
                if cdf[mid] > target:
                    hi = mid
                else:
                    lo = mid + 1
            # a rounding slip can land past the end or on a zero-weight point
            cand[l] = min(lo, last)
        best, best_pot = cand[0], np.inf
        for l in range(L):
            c = cand[l]
            pot = _potential(gram[c], diag, diag[c], mind)
            if pot < best_pot:
                best_pot = pot
                best = c
        chosen[t] = best
        taken[best] = True
        grow = gram[best]
        dc = diag[best]
        for j in range(n):
            d = diag[j] + dc - 2.0 * np.float64(grow[j])
            d = d if d > 0.0 else 0.0
            if d < mind[j]:
                mind[j] = d
                labels[j] = t
        mind[best] = 0.0
        labels[best] = t
    return chosen


@_jit()
def mirror_lower(gram):
    """Copy the lower triangle of the square ``gram`` onto the upper one, in place, by tiles."""
    n = gram.shape[0]
    T = 64
    for i0 in range(0, n, T):
        i1 = min(i0 + T, n)
        for j0 in range(0, i1, T):
            j1 = min(j0 + T, n)
            for i in range(i0, i1):
                for j in range(j0, min(j1, i)):
                    gram[j, i] = gram[i, j]


@_jit(fastmath={"reassoc", "nsz"})
def _potential(grow, diag, dc, mind):
    """``sum_j min(mind_j, |x_j - x_c|^2)`` for the point c of Gram row ``grow`` (the sum is
    reassociated so that it vectorises: a fixed order for a given compiled kernel)."""
    pot = 0.0
    for j in range(grow.shape[0]):
        d = diag[j] + dc - 2.0 * np.float64(grow[j])
        d = max(d, 0.0)
        pot += min(d, mind[j])
    return pot


@_jit()
def cluster_sums(gram, labels, k, SX, SS, cnt):
    """Recompute ``SX`` [k, n] (``SX[c, j] = x_j . s_c``), ``SS`` [k] and ``cnt`` [k] from
    ``labels`` (float64 sums, members in index order)."""
    n = gram.shape[0]
    SX[:, :] = 0.0
    SS[:] = 0.0
    cnt[:] = 0
    for i in range(n):
        c = labels[i]
        cnt[c] += 1
        row = SX[c]
        gi = gram[i]
        for j in range(n):
            row[j] += gi[j]
    for j in range(n):
        SS[labels[j]] += SX[labels[j], j]


@_jit()
def lloyd(gram, k, chosen, labels, max_iter, thresh, SX, SS, cnt):
    """Lloyd iterations in Gram space from the seeds ``chosen`` and the ``labels`` (nearest seed)
    whose sums ``SX``, ``SS``, ``cnt`` are given; updates all four in place and returns the number
    of iterations run. Stops when no label changes or the summed squared centre shift is at most
    ``thresh``. An empty cluster gets the farthest point of a cluster of size > 1."""
    n = gram.shape[0]
    diag = np.empty(n)
    for i in range(n):
        diag[i] = gram[i, i]
    new = np.empty(n, np.int64)
    best = np.empty(n)
    dist = np.empty(n)
    cross = np.empty(k)
    old_lab = labels.copy()
    old_ss = SS.copy()
    old_cnt = cnt.copy()
    it = 0
    for it in range(1, max_iter + 1):
        # the centres are the means of ``labels``; the previous ones were the seeds (first
        # iteration) or the means of the previous labels. Squared shift of every centre:
        # |c_new|^2 + |c_old|^2 - 2 c_new . c_old
        shift = 0.0
        if it == 1:
            for c in range(k):
                s = chosen[c]
                nc = cnt[c]
                if nc > 0:
                    shift += SS[c] / (nc * nc) + diag[s] - 2.0 * SX[c, s] / nc
        else:
            cross[:] = 0.0
            for i in range(n):
                cross[old_lab[i]] += SX[old_lab[i], i]
            for c in range(k):
                nc, oc = cnt[c], old_cnt[c]
                if nc > 0 and oc > 0:
                    shift += SS[c] / (nc * nc) + old_ss[c] / (oc * oc) - 2.0 * cross[c] / (nc * oc)
        # assignment: argmin_c -2 SX[c, j] / n_c + SS_c / n_c^2 (ties to the lower c)
        best[:] = np.inf
        new[:] = 0
        for c in range(k):
            if cnt[c] == 0:  # an empty cluster attracts nobody
                continue
            inv = -2.0 / cnt[c]
            off = SS[c] / (cnt[c] * cnt[c])
            row = SX[c]
            for j in range(n):
                v = inv * row[j] + off
                ok = v < best[j]
                best[j] = v if ok else best[j]
                new[j] = c if ok else new[j]
        for j in range(n):
            d = diag[j] + best[j]
            dist[j] = d if d > 0.0 else 0.0
        fill_empty(new, dist, k)
        changed = 0
        for j in range(n):
            if new[j] != labels[j]:
                changed += 1
        if changed == 0:
            break
        old_lab[:] = labels
        old_ss[:] = SS
        old_cnt[:] = cnt
        # the sums of the new labels: move the changed points one by one when they are few
        if changed * 16 < n:
            for j in range(n):
                if new[j] != labels[j]:
                    _move(gram, j, labels[j], new[j], labels, SX, SS, cnt)
        else:
            labels[:] = new
            cluster_sums(gram, labels, k, SX, SS, cnt)
        if shift <= thresh:
            break
    return it


@_jit()
def _move(gram, j, a, b, labels, SX, SS, cnt):
    """Move point j from cluster a to cluster b, updating the sums."""
    g = np.float64(gram[j, j])
    SS[a] += g - 2.0 * SX[a, j]
    SS[b] += g + 2.0 * SX[b, j]
    gj = gram[j]
    ra = SX[a]
    rb = SX[b]
    for i in range(gj.shape[0]):
        gi = np.float64(gj[i])
        ra[i] -= gi
        rb[i] += gi
    cnt[a] -= 1
    cnt[b] += 1
    labels[j] = b


@_jit()
def fill_empty(labels, dist, k):
    """Give every empty cluster the farthest point (``dist``, ties to the lower index) of a cluster
    that has more than one point, in place: points are taken farthest first, the last empty
    cluster first. (A selection per point instead of a sort: empty clusters are rare, and numba's
    sorts are slow to compile.)"""
    n = labels.shape[0]
    cnt = np.zeros(k, np.int64)
    for i in range(n):
        cnt[labels[i]] += 1
    n_empty = 0
    for c in range(k):
        if cnt[c] == 0:
            n_empty += 1
    if n_empty == 0:
        return
    empty = np.empty(n_empty, np.int64)
    e = 0
    for c in range(k):
        if cnt[c] == 0:
            empty[e] = c
            e += 1
    seen = np.zeros(n, np.bool_)
    for _ in range(n):
        if n_empty == 0:
            break
        far, fd = -1, -np.inf
        for i in range(n):
            if not seen[i] and (far < 0 or dist[i] > fd):
                far, fd = i, dist[i]
        seen[far] = True
        a = labels[far]
        if cnt[a] > 1:
            n_empty -= 1
            j = empty[n_empty]
            cnt[a] -= 1
            cnt[j] += 1
            labels[far] = j


_BLOCK = 64  # points scanned together in the Hartigan sweep


@_jit()
def hartigan(gram, k, labels, rel_tol, max_sweeps, SX, SS, cnt):
    """Sequential Hartigan single-point moves to convergence, in place; returns the moves made.

    Points are visited in index order; each moves to the cluster that lowers the objective most
    (``n_b/(n_b+1) |x-c_b|^2 - n_a/(n_a-1) |x-c_a|^2 < 0``, ties to the lower cluster) as soon as
    it is visited, so later points see the updated clusters. A point never leaves a singleton, so
    no cluster empties. A move must gain more than ``rel_tol * (G[j, j] + its cost)``, so float
    noise cannot move points. Runs until a full sweep moves nothing (or ``max_sweeps``).

    ``SX``, ``SS``, ``cnt`` must hold the sums of ``labels`` on entry; they are kept current.

    For speed the best destinations of ``_BLOCK`` consecutive points are found together (reading
    ``SX`` row by row, contiguously); after each move inside the block, the later points of the
    block get their costs for the two changed clusters recomputed, and a point whose best
    destination was one of them is rescanned. Every point therefore sees exactly the values a
    one-point-at-a-time scan would see, and makes the same choice.
    """
    n = gram.shape[0]
    diag = np.empty(n)
    for i in range(n):
        diag[i] = gram[i, i]
    # cost of adding x_j to c: (n_c G_jj - 2 SX[c, j] + SS_c / n_c) / (n_c + 1) = A G_jj + B SX + C
    A = np.empty(k)
    Bc = np.empty(k)
    C = np.empty(k)
    for c in range(k):
        _coef(c, cnt, SS, A, Bc, C)
    bval = np.empty(_BLOCK)
    bidx = np.empty(_BLOCK, np.int64)
    moves = 0
    for sweep in range(max_sweeps):
        moved = 0
        for j0 in range(0, n, _BLOCK):
            j1 = min(j0 + _BLOCK, n)
            m = j1 - j0
            _block_scan(SX, A, Bc, C, diag[j0:j1], labels[j0:j1], j0, m, bval, bidx)
            for q in range(m):
                j = j0 + q
                a = labels[j]
                na = cnt[a]
                if na <= 1:
                    continue
                g = diag[j]
                out = (g - 2.0 * SX[a, j] / na + SS[a] / (na * na)) * na / (na - 1.0)
                best, b = bval[q], bidx[q]
                if not out - best > rel_tol * (g + out):
                    continue
                _move(gram, j, a, b, labels, SX, SS, cnt)
                _coef(a, cnt, SS, A, Bc, C)
                _coef(b, cnt, SS, A, Bc, C)
                moved += 1
                # the later points of the block: costs for a and b changed
                for r in range(q + 1, m):
                    jr = j0 + r
                    if bidx[r] == a or bidx[r] == b:  # its best may have got worse: rescan
                        own = labels[jr]
                        bv, bi = np.inf, -1
                        for c in range(k):
                            v = A[c] * diag[jr] + Bc[c] * SX[c, jr] + C[c]
                            if v < bv and c != own:
                                bv, bi = v, c
                        bval[r], bidx[r] = bv, bi
                    else:
                        for c in (a, b) if a < b else (b, a):
                            if c == labels[jr]:
                                continue
                            v = A[c] * diag[jr] + Bc[c] * SX[c, jr] + C[c]
                            if v < bval[r] or (v == bval[r] and c < bidx[r]):
                                bval[r], bidx[r] = v, c
        moves += moved
        if moved == 0:
            break
    return moves


@_jit()
def _block_scan(SX, A, Bc, C, d, lab, j0, m, bval, bidx):
    """Cheapest destination (value ``bval``, cluster ``bidx``, ties to the lower cluster) other
    than their own (``lab``) of the ``m`` points from ``j0`` on; branch-free so it vectorises."""
    k = SX.shape[0]
    bval[:m] = np.inf
    bidx[:m] = -1
    for c in range(k):
        a_, b_, c_ = A[c], Bc[c], C[c]
        row = SX[c, j0:j0 + m]
        for q in range(m):
            v = a_ * d[q] + b_ * row[q] + c_
            ok = (v < bval[q]) & (lab[q] != c)
            bval[q] = v if ok else bval[q]
            bidx[q] = c if ok else bidx[q]


@_jit()
def _coef(c, cnt, SS, A, Bc, C):
    """Coefficients of the cost of adding a point to cluster c (see ``hartigan``)."""
    nc = cnt[c]
    A[c] = nc / (nc + 1.0)
    Bc[c] = -2.0 / (nc + 1.0)
    C[c] = SS[c] / (nc * (nc + 1.0)) if nc > 0 else 0.0


@_jit()
def solve_run(gram, k, dim, u_first, u_trials, max_iter, tol, refine, rel_tol, max_sweeps, labels):
    """One run: seeding, Lloyd, Hartigan. Writes ``labels`` [n]; returns (Lloyd iters, moves).

    Lloyd's threshold is scikit-learn's: ``tol`` times the mean per-feature variance of the
    (centred) data, which is ``trace(G) / (n dim)``.
    """
    n = gram.shape[0]
    trace = 0.0
    for i in range(n):
        trace += gram[i, i]
    thresh = tol * trace / (n * dim)
    chosen = kmeanspp(gram, k, u_first, u_trials, labels)
    SX = np.empty((k, n))
    SS = np.empty(k)
    cnt = np.empty(k, np.int64)
    cluster_sums(gram, labels, k, SX, SS, cnt)
    it = lloyd(gram, k, chosen, labels, max_iter, thresh, SX, SS, cnt) if max_iter > 0 else 0
    moves = hartigan(gram, k, labels, rel_tol, max_sweeps, SX, SS, cnt) if refine else 0
    return it, moves


@_jit()
def column_means(x, mean):
    """``mean`` (float64) [dim] = the column means of ``x`` [n, dim], summed in index order."""
    n, dim = x.shape
    mean[:] = 0.0
    for i in range(n):
        xi = x[i]
        for d in range(dim):
            mean[d] += xi[d]
    for d in range(dim):
        mean[d] /= n


@_jit()
def center_rows(x, mean, out):
    """``out`` (float32) = the rows ``x`` [m, dim] minus ``mean`` (float64 [dim]), rounded once."""
    m, dim = x.shape
    for i in range(m):
        xi = x[i]
        oi = out[i]
        for d in range(dim):
            oi[d] = np.float32(xi[d] - mean[d])


@_jit()
def exact_stats(x, labels, k, centers):
    """Float64 means ``centers`` [k, dim] of the points of ``x`` [n, dim] (summed in index order;
    an empty cluster's mean is 0) and the exact float64 inertia, which is returned."""
    n, dim = x.shape
    centers[:, :] = 0.0
    cnt = np.zeros(k)
    for i in range(n):
        c = labels[i]
        cnt[c] += 1.0
        row = centers[c]
        xi = x[i]
        for d in range(dim):
            row[d] += np.float64(xi[d])
    for c in range(k):
        if cnt[c] > 1.0:
            centers[c] /= cnt[c]
    inertia = 0.0
    for i in range(n):
        inertia += _sqdist(x[i], centers[labels[i]])
    return inertia


@_jit(fastmath={"reassoc", "nsz"})
def _sqdist(xi, row):
    """Float64 ``|xi - row|^2`` (reassociated so that it vectorises; a fixed order)."""
    s = 0.0
    for d in range(xi.shape[0]):
        e = np.float64(xi[d]) - row[d]
        s += e * e
    return s





def cache_is_cold() -> bool:
    """Whether a kernel the k-means calls first has no compiled version for this source in its on-disk
    cache yet. False when there is no on-disk cache (compiling elsewhere would not help then), or when
    this numba's cache cannot be inspected."""
    try:
        return any(not f._cache._cache_file._load_index() for f in (column_means, center_rows, mirror_lower,
                                                                    solve_run, exact_stats))
    except Exception:  # no on-disk cache (numba's NullCache) or another numba's internals
        return False
