"""MERGE's hierarchical edges: clusters of one slide's spots, each tied to its centroid spot.

Per slide, two clusterings (k-means in space on the spot centres, k-means in feature space on the
frozen patch features). For every cluster the "centroid spot" is the member whose features are
closest to the cluster's mean feature; it is joined to every other member (intra-cluster edges),
and all centroid spots of both clusterings are joined to each other (inter-cluster shortcut
edges). These are added to the spatial k-NN graph the DataModule serves. Deterministic: k-means
uses k-means++ seeding from a fixed-seed generator, keeps the best of `n_init` runs by inertia.
"""

from __future__ import annotations

import torch


def kmeans(x: torch.Tensor, k: int, n_init: int = 10, iters: int = 100, seed: int = 0) -> torch.Tensor:
    """(N, D) -> (N,) cluster labels in 0..k'-1 (k' = min(k, N)); deterministic for a seed."""
    x = x.detach().double()
    n = x.shape[0]
    k = max(1, min(int(k), n))
    g = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(max(1, n_init)):
        centres = _plusplus(x, k, g)
        labels = torch.zeros(n, dtype=torch.long)
        for it in range(iters):
            new = torch.cdist(x, centres).argmin(1)
            if it > 0 and torch.equal(new, labels):
                break
            labels = new
            for c in range(k):
                members = labels == c
                if members.any():
                    centres[c] = x[members].mean(0)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels.clone(), inertia
    return _relabel(best)


def _plusplus(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    centres = [x[int(torch.randint(n, (1,), generator=g))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        i = (
            int(torch.multinomial(d2 / total, 1, generator=g))
            if total > 0
            else int(torch.randint(n, (1,), generator=g))
        )
        centres.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return torch.stack(centres).clone()


def _relabel(labels: torch.Tensor) -> torch.Tensor:
    """Clusters numbered in order of first appearance (empty clusters dropped)."""
    _, first = torch.unique(labels, return_inverse=True)
    return first


def centroid_spots(labels: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """For each cluster, the index of the member nearest (in feature space) to the cluster's mean feature."""
    out = []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        f = feats[members].double()
        out.append(members[int(torch.cdist(f, f.mean(0, keepdim=True)).argmin())])
    return torch.stack(out)


def cluster_edges(labels: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intra-cluster star edges (every member <-> its centroid spot), one direction; and the centroids."""
    centres = centroid_spots(labels, feats)
    hub = centres[labels]  # each spot's centroid spot
    spokes = torch.arange(labels.shape[0])
    keep = spokes != hub
    return torch.stack([spokes[keep], hub[keep]]), centres


def symmetric_unique(edges: torch.Tensor) -> torch.Tensor:
    """Both directions, duplicates and self loops removed, sorted."""
    if edges.numel() == 0:
        return edges.reshape(2, 0).long()
    both = torch.cat([edges, edges.flip(0)], dim=1)
    both = both[:, both[0] != both[1]]
    return torch.unique(both, dim=1)


def hierarchical_edges(
    coords: torch.Tensor,
    feats: torch.Tensor,
    spatial_k: int = 5,
    feature_k: int = 5,
    seed: int = 0,
    n_init: int = 10,
) -> torch.Tensor:
    """(2, E) symmetric cluster edges of one slide (no spatial k-NN edges; no self loops)."""
    n = coords.shape[0]
    if n < 2:
        return torch.zeros(2, 0, dtype=torch.long)
    coords, feats = coords.detach().cpu(), feats.detach().cpu()
    parts, hubs = [], []
    for x, k in ((coords, spatial_k), (feats, feature_k)):
        if k < 1:
            continue
        e, c = cluster_edges(kmeans(x, k, n_init=n_init, seed=seed), feats)
        parts.append(e)
        hubs.append(c)
    if not parts:
        return torch.zeros(2, 0, dtype=torch.long)
    hub = torch.unique(torch.cat(hubs))
    a, b = torch.meshgrid(hub, hub, indexing="ij")
    parts.append(torch.stack([a.flatten(), b.flatten()]))  # shortcut clique among centroid spots
    return symmetric_unique(torch.cat(parts, dim=1))
