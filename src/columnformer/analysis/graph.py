"""Graph summaries of the strong connections of a sheet (networkx).

The *strong graph* keeps the ``n_edges`` heaviest edges of the mean attention (averaged over
steps, self-edges excluded) and forgets their direction and weight. On it we measure degree
distributions, community structure (Louvain modularity, seeded), clustering and average shortest
path length, and compare the last two with degree-matched random graphs (double-edge swaps for
small graphs, the configuration model for large ones) to get the small-world index

    sigma = (C / C_rand) / (L / L_rand)

Path lengths are averaged over the largest connected component; above ``exact_path_nodes`` nodes
they come from BFS from a seeded sample of sources (the sample size is recorded).
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import torch

_SWAP_MAX_EDGES = 20_000


def strong_graph(weights, sources: np.ndarray, n_edges: int, mask: np.ndarray | None = None) -> tuple[nx.Graph, dict]:
    """Undirected graph of the ``n_edges`` heaviest directed edges (self-edges excluded).

    ``weights`` (N, E) mean attention per edge (e.g. averaged over steps), ``sources`` (N, E) the
    source column of each edge. Returns the graph (all N nodes, isolated ones included) and the
    directed edge list / threshold that defined it.
    """
    w = weights.detach().cpu().double().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights, float)
    N, E = w.shape
    src = np.asarray(sources)
    dst = np.broadcast_to(np.arange(N)[:, None], (N, E))
    ok = src != dst
    if mask is not None:
        ok &= mask
    flat_w = np.where(ok, w, -np.inf).ravel()
    n_valid = int(ok.sum())
    n_edges = int(min(max(n_edges, 0), n_valid))
    if n_edges == 0:
        g = nx.Graph()
        g.add_nodes_from(range(N))
        return g, {"n_edges": 0, "threshold": None, "src": np.zeros(0, int), "dst": np.zeros(0, int)}
    keep = np.argpartition(-flat_w, n_edges - 1)[:n_edges]
    keep = keep[np.argsort(-flat_w[keep], kind="stable")]
    s = src.ravel()[keep]
    d = dst.ravel()[keep]
    g = nx.Graph()
    g.add_nodes_from(range(N))
    g.add_edges_from(zip(s.tolist(), d.tolist()))
    return g, {"n_edges": n_edges, "threshold": float(flat_w[keep[-1]]), "src": s, "dst": d, "weight": flat_w[keep]}


def degree_histogram(degrees: np.ndarray) -> list[int]:
    return np.bincount(np.asarray(degrees, dtype=np.int64)).tolist() if len(degrees) else []


def modularity(g: nx.Graph, seed: int = 0) -> dict:
    """Louvain communities (seeded) and their modularity; 0 for a graph without edges."""
    if g.number_of_edges() == 0:
        return {"modularity": 0.0, "num_communities": g.number_of_nodes(), "community_sizes": [], "method": "louvain"}
    comms = nx.community.louvain_communities(g, seed=seed)
    q = nx.community.modularity(g, comms)
    sizes = sorted((len(c) for c in comms), reverse=True)
    return {"modularity": float(q), "num_communities": len(comms), "community_sizes": sizes[:50], "method": "louvain"}


def _largest_component(g: nx.Graph) -> nx.Graph:
    if g.number_of_nodes() == 0:
        return g
    nodes = max(nx.connected_components(g), key=len)
    return g.subgraph(nodes)


def average_path_length(g: nx.Graph, max_sources: int = 256, seed: int = 0) -> tuple[float, dict]:
    """Mean shortest-path length on the largest connected component (BFS from sampled sources when large)."""
    h = _largest_component(g)
    n = h.number_of_nodes()
    if n < 2:
        return float("nan"), {"component_nodes": n, "sources": 0, "exact": True}
    nodes = np.array(list(h.nodes()))
    exact = n <= max_sources
    if not exact:
        nodes = np.random.default_rng(seed).choice(nodes, size=max_sources, replace=False)
    total, count = 0.0, 0
    for s in nodes.tolist():
        lengths = nx.single_source_shortest_path_length(h, s)
        total += sum(lengths.values())
        count += len(lengths) - 1
    return total / max(count, 1), {"component_nodes": n, "sources": len(nodes), "exact": exact}


def random_reference(g: nx.Graph, seed: int = 0) -> tuple[nx.Graph, str]:
    """A degree-matched random graph: double-edge swaps (small graphs) or configuration model (large)."""
    m = g.number_of_edges()
    if m <= _SWAP_MAX_EDGES:
        r = nx.Graph(g)
        if m >= 2:
            try:
                nx.double_edge_swap(r, nswap=4 * m, max_tries=400 * m, seed=seed)
            except (nx.NetworkXAlgorithmError, nx.NetworkXError):
                pass  # too few possible swaps (e.g. near-complete graph): keep what was done
        return r, "double_edge_swap"
    degrees = [d for _, d in g.degree()]
    r = nx.Graph(nx.configuration_model(degrees, seed=seed))
    r.remove_edges_from(nx.selfloop_edges(r))
    return r, "configuration_model"


def small_world(g: nx.Graph, n_random: int = 3, seed: int = 0, max_sources: int = 256) -> dict:
    """Clustering C and path length L vs degree-matched random graphs; sigma = (C/Cr)/(L/Lr)."""
    if g.number_of_edges() == 0:
        return {"clustering": 0.0, "path_length": float("nan"), "sigma": float("nan"), "n_random": 0}
    c = nx.average_clustering(g)
    L, info = average_path_length(g, max_sources, seed)
    cr, lr, method = [], [], None
    for i in range(n_random):
        r, method = random_reference(g, seed + 1 + i)
        cr.append(nx.average_clustering(r))
        lr.append(average_path_length(r, max_sources, seed)[0])
    c_rand, l_rand = float(np.mean(cr)), float(np.nanmean(lr)) if lr else float("nan")
    gamma = c / c_rand if c_rand > 0 else float("nan")
    lam = L / l_rand if l_rand and not math.isnan(l_rand) else float("nan")
    sigma = gamma / lam if lam and not math.isnan(lam) and not math.isnan(gamma) else float("nan")
    return {
        "clustering": float(c), "path_length": float(L), "clustering_random": c_rand, "path_length_random": l_rand,
        "gamma": float(gamma), "lambda": float(lam), "sigma": float(sigma), "n_random": n_random,
        "random_method": method, "path_sampling": info,
    }


def graph_summary(g: nx.Graph, seed: int = 0, n_random: int = 3, max_sources: int = 256) -> dict:
    """Everything measured on one strong graph (JSON-ready)."""
    deg = np.array([d for _, d in g.degree()])
    out = {
        "nodes": g.number_of_nodes(),
        "edges": g.number_of_edges(),
        "mean_degree": float(deg.mean()) if len(deg) else 0.0,
        "degree_histogram": degree_histogram(deg),
        "isolated_nodes": int((deg == 0).sum()),
        "connected_components": nx.number_connected_components(g) if g.number_of_nodes() else 0,
    }
    out.update(modularity(g, seed))
    out["small_world"] = small_world(g, n_random=n_random, seed=seed, max_sources=max_sources)
    return out


def strong_graph_summary(weights, sources, mask=None, edges_per_column: float = 4.0, seed: int = 0, n_random: int = 3) -> dict:
    """:func:`strong_graph` with ``round(edges_per_column * N)`` directed edges, then :func:`graph_summary`,
    plus in/out degree distributions of the directed strong edges."""
    N = np.asarray(sources).shape[0]
    g, info = strong_graph(weights, sources, int(round(edges_per_column * N)), mask)
    summary = graph_summary(g, seed=seed, n_random=n_random)
    summary["criterion"] = f"top {info['n_edges']} directed edges by mean attention (self-edges excluded)"
    summary["edges_per_column"] = edges_per_column
    summary["directed_edges"] = info["n_edges"]
    summary["threshold"] = info["threshold"]
    summary["in_degree_histogram"] = degree_histogram(np.bincount(info["dst"], minlength=N))
    summary["out_degree_histogram"] = degree_histogram(np.bincount(info["src"], minlength=N))
    return summary
