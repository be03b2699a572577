"""Nearest-code search and the k-means that initialises codebooks; float32, chunked, never one-hot.

Every distance matrix is computed ``_DISTANCE_CHUNK_ELEMENTS`` entries at a time, so the extra memory
of a search is bounded whatever the number of vectors N and codes K.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Rows of the (rows x K) distance matrix computed at once: bounds the search's extra memory
# to about _DISTANCE_CHUNK_ELEMENTS floats whatever N is.
_DISTANCE_CHUNK_ELEMENTS = 1 << 24
# On the CPU the search's score block is smaller, 2^20 floats (4 MiB), so that it is still in the cache
# when the argmin reads what the matrix product wrote (at K = 512, 2,048 rows: about 1.5x faster than
# 64 MiB blocks), but never under _CPU_SEARCH_MIN_ROWS rows: each block reads the whole (C, K) codebook
# again, which at K = 8,192 costs more than the cache saves. GPUs want big blocks (one launch per block).
_CPU_SEARCH_CHUNK_ELEMENTS = 1 << 20
_CPU_SEARCH_MIN_ROWS = 1024

# k-means++ picks its centres in at most this many rounds (see ``kmeans_plus_plus``).
_SEEDING_ROUNDS = 256
# k-means++ seeds from at most this many rows per cluster (a random subset; see ``kmeans``).
_SEEDING_ROWS_PER_CLUSTER = 4


def _rows_per_chunk(columns: int, elements: int = _DISTANCE_CHUNK_ELEMENTS) -> int:
    """Rows of an (rows x columns) distance block that fit in ``elements`` floats."""
    return max(1, elements // max(columns, 1))


def nearest_code(flat: torch.Tensor, codebook: torch.Tensor, *, cosine: bool = False) -> torch.Tensor:
    """Index of the nearest codebook vector for every row.

    Args:
      flat: (N, C) vectors, any float dtype (computed in float32).
      codebook: (K, C) codebook.
      cosine: rank the codes by their dot product with the row instead of the euclidean distance. For
        unit-norm codes (l2-normalised codebooks) that is the highest cosine similarity, and the same
        order as the euclidean distance, without the rounding noise of ``||e||^2`` (exactly 1 only in theory).

    Returns:
      (N,) long indices in [0, K). Not differentiable (no graph is recorded).
    """
    # Callers may be under autocast (bf16 encoders): the distances must not be, or near-ties flip.
    with torch.no_grad(), torch.autocast(device_type=flat.device.type, enabled=False):
        return _nearest_code_fp32(flat.float(), codebook.float(), cosine)


def _nearest_code_fp32(flat: torch.Tensor, codebook: torch.Tensor, cosine: bool) -> torch.Tensor:
    n, c = flat.shape
    k = codebook.shape[0]
    if cosine:
        # Unit-norm codes: the largest z.e is the smallest angle.
        weights = codebook.t().contiguous()  # (C, K)
    else:
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e; ||z||^2 is the same for every code of a row, so it cannot
        # change the argmin and is left out. The rest is one matrix product: [z, 1] . [-2e, ||e||^2], so the
        # norm term costs no separate pass over the (rows, K) scores.
        weights = torch.cat([-2.0 * codebook, codebook.pow(2).sum(dim=1, keepdim=True)], dim=1).t().contiguous()
    if flat.device.type == "cpu":
        rows_per_chunk = max(_rows_per_chunk(k, _CPU_SEARCH_CHUNK_ELEMENTS), _CPU_SEARCH_MIN_ROWS)
    else:
        rows_per_chunk = _rows_per_chunk(k)
    rows_per_chunk = min(rows_per_chunk, max(n, 1))
    scores = flat.new_empty(rows_per_chunk, k)  # reused by every chunk
    if not cosine:
        rows_with_one = flat.new_ones(rows_per_chunk, c + 1)  # [z, 1] per row; z is copied in per chunk
    indices = torch.empty(n, dtype=torch.long, device=flat.device)
    for start in range(0, n, rows_per_chunk):
        size = min(rows_per_chunk, n - start)
        if cosine:
            torch.mm(flat[start : start + size], weights, out=scores[:size])
            torch.argmax(scores[:size], dim=1, out=indices[start : start + size])
        else:
            rows_with_one[:size, :c].copy_(flat[start : start + size])
            torch.mm(rows_with_one[:size], weights, out=scores[:size])
            torch.argmin(scores[:size], dim=1, out=indices[start : start + size])
    return indices


def perplexity_of(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the distribution ``counts / counts.sum()``; (K,) -> scalar."""
    probs = counts / counts.sum().clamp_min(1.0)
    # 0 * log 0 is taken as 0: xlogy does exactly that.
    return torch.exp(-torch.special.xlogy(probs, probs).sum())


def _min_sq_distance(flat: torch.Tensor, flat_sq: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distance from every row to its nearest centre, chunked.

    Args:
      flat: (N, C) float32 rows; flat_sq: (N,) their squared norms; centres: (M, C) float32.

    Returns:
      (N,) float32, >= 0.
    """
    centres_sq = centres.pow(2).sum(dim=1)  # (M,)
    out = torch.empty_like(flat_sq)
    rows_per_chunk = _rows_per_chunk(centres.shape[0])
    for start in range(0, flat.shape[0], rows_per_chunk):
        chunk = flat[start : start + rows_per_chunk]
        # ||e||^2 - 2 z.e for every centre, then + ||z||^2 after the min (constant per row).
        partial = torch.addmm(centres_sq, chunk, centres.t(), beta=1.0, alpha=-2.0).amin(dim=1)
        out[start : start + chunk.shape[0]] = partial + flat_sq[start : start + chunk.shape[0]]
    return out.clamp_min_(0.0)  # cancellation can leave tiny negatives for a row on a centre


def kmeans_plus_plus(flat: torch.Tensor, num_clusters: int, rounds: int = _SEEDING_ROUNDS) -> torch.Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii 2007), batched: (N, C) float32 -> (num_clusters, C).

    Each centre is a row drawn with probability proportional to its squared distance to the nearest
    centre chosen so far, which spreads the centres over the data. Drawing one centre at a time costs
    ``num_clusters`` passes over all N rows (minutes at K = 16,384 on two cores), so the centres are drawn
    in at most ``rounds`` rounds: a round draws ``ceil((num_clusters - 1) / rounds)`` distinct rows at once
    from the current distances (as k-means|| does, Bahmani et al. 2012), then updates the distances with
    one chunked matrix product. Up to ``rounds + 1`` clusters this is exactly sequential k-means++.
    """
    n = flat.shape[0]
    flat_sq = flat.pow(2).sum(dim=1)  # (N,)
    first = torch.randint(0, n, (1,), device=flat.device)
    chosen = [first]
    nearest_sq = _min_sq_distance(flat, flat_sq, flat[first])  # (N,) squared distance to the closest centre
    nearest_sq[first] = 0.0
    remaining = num_clusters - 1
    per_round = max(1, math.ceil(remaining / max(rounds, 1)))
    while remaining > 0:
        take = min(per_round, remaining)
        candidates = (nearest_sq > 0).nonzero().squeeze(1)  # rows not on a centre yet
        if candidates.numel() >= take:
            picks = torch.multinomial(nearest_sq, take, replacement=False)
        else:  # fewer distinct rows than clusters: take every row left, then repeat random rows
            extra = torch.randint(0, n, (take - candidates.numel(),), device=flat.device)
            picks = torch.cat([candidates, extra])
        chosen.append(picks)
        nearest_sq = torch.minimum(nearest_sq, _min_sq_distance(flat, flat_sq, flat[picks]))
        nearest_sq[picks] = 0.0  # exactly 0 on a centre (the matrix product leaves rounding noise)
        remaining -= take
    return flat[torch.cat(chosen)].clone()


def kmeans(flat: torch.Tensor, num_clusters: int, iters: int, *, spherical: bool = False) -> torch.Tensor:
    """Lloyd's k-means from k-means++ seeds. (N, C) float32 -> (num_clusters, C) centres.

    The seeds come from k-means++ on at most ``_SEEDING_ROWS_PER_CLUSTER * num_clusters`` random rows. An empty
    cluster keeps its previous centre. ``spherical``: the rows are unit vectors, assignment is by
    cosine similarity and every centre is renormalised to unit length (the mean direction of its cluster).
    """
    # Seeding costs one pass of every row against every centre: on a random subset of
    # _SEEDING_ROWS_PER_CLUSTER rows per cluster it stays a fraction of one Lloyd iteration; Lloyd then
    # refines the seeds on every row.
    seed_rows = _SEEDING_ROWS_PER_CLUSTER * num_clusters
    subset = flat if flat.shape[0] <= seed_rows else flat[torch.randperm(flat.shape[0], device=flat.device)[:seed_rows]]
    centres = kmeans_plus_plus(subset, num_clusters)
    for _ in range(iters):
        assign = nearest_code(flat, centres, cosine=spherical)  # (N,)
        counts = torch.bincount(assign, minlength=num_clusters).float()  # (K,)
        sums = torch.zeros_like(centres).index_add_(0, assign, flat)  # (K, C)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        if spherical:
            centres = F.normalize(centres, dim=1)
    return centres
