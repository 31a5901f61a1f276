"""Learned projections of real images into an SDM address space (the original's ``LearnProjections``).

Images are D-dimensional vectors (here the embedded 8x8 digits, D = 64). A matrix W (n, D) maps each image
to an address ``normalise(W x)`` on the unit sphere of R^n. Training (:func:`learn_projection`) perturbs each
image to a random cosine with itself, reads the memory of all training images once with attention
``softmax(beta cos(W q, W k)) @ images`` (beta fitted to the binary circle intersection of radius ``d`` in n
dimensions, as the original) and minimises the squared reconstruction error by Adam.

Recall (:func:`recall_images`) then iterates ``q <- sum_j w_j(W q) x_j / sum_j w_j`` in image space with four
weightings of the stored images, computed on the projected addresses:

* ``binary_sdm``: the binary circle intersection at the Hamming distance n(1 - cos)/2 (the original's
  ``Cont_Binary_SDM``, :class:`memories.PatternSDM` with ``binary=False``);
* ``cap_sdm``: the hypersphere-cap intersection (``Cont_SDM``, :class:`memories.CapSDM`);
* ``binary_attention`` / ``cap_attention``: softmax with beta fitted to the binary / cap intersection
  (``Cont_SDM_BFit_Attention`` / ``Cont_SDM_CFit_Attention``).

``r`` neurons (None = infinitely many) apply to the two SDM weightings (stochastic rounding of the expected
counts). A read that finds no neuron leaves the query unchanged. :func:`perturb_images` also reports whether
each perturbed query is still closest (in image space) to its own image: the "closest pattern stays closest"
check of the original, without which a recall failure can be a correct recall of another image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import memories as mem
from . import theory

ALGORITHMS = ("binary_sdm", "cap_sdm", "binary_attention", "cap_attention")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def perturb_images(
    images: torch.Tensor, cosine: torch.Tensor | float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each image (B, D) to the given cosine with itself (same norm; a random direction orthogonal to it).

    Returns the perturbed images and a (B,) bool tensor: True where the image itself is still the closest
    (largest cosine) of ``images``' rows to its perturbed version.
    """
    b = images.shape[0]
    c = torch.as_tensor(cosine, dtype=images.dtype).expand(b).unsqueeze(1)  # (B, 1)
    if torch.any(c < -1) or torch.any(c > 1):
        raise ValueError("perturbation cosines must lie in [-1, 1]")
    u = _unit(images)
    noise = torch.rand(images.shape, generator=gen, dtype=images.dtype) * 2 - 1
    perp = _unit(noise - (noise * u).sum(1, keepdim=True) * u)  # (B, D) orthogonal to each image
    out = (c * u + torch.sqrt(1 - c * c) * perp) * images.norm(dim=1, keepdim=True)
    sims = _unit(out) @ u.T  # (B, B)
    closest = sims.argmax(1) == torch.arange(b)
    return out, closest


@dataclass
class Projection:
    """A learned projection W (n, D), its training losses (one per batch) and, when learned with it, beta."""

    weight: torch.Tensor
    losses: list[float]
    beta: float | None = None

    def address(self, x: torch.Tensor) -> torch.Tensor:
        """Unit addresses (B, n) of images (B, D)."""
        return _unit(x @ self.weight.T)


def learn_projection(
    images: torch.Tensor, n: int = 64, d: int = 11, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
    min_cosine: float = 0.5, seed: int = 0, learn_beta: bool = False,
) -> Projection:
    """Learn W (n, D) so one attention read of the perturbed image recovers the image (see the module doc).

    Training queries are the training images perturbed to cosines drawn uniformly from [min_cosine, 1].
    ``learn_beta``: beta is a parameter learned with W (the original's ``LearnProjections-Beta``), started
    at the binary-fitted value; otherwise it stays fixed at that value.
    """
    if images.ndim != 2 or images.shape[0] < 2:
        raise ValueError(f"images must be (m >= 2, D), got {tuple(images.shape)}")
    theory.check_n_d(n, d)
    if not (-1 <= min_cosine <= 1 and epochs >= 1 and batch_size >= 1 and lr > 0):
        raise ValueError("need min_cosine in [-1, 1], epochs >= 1, batch_size >= 1 and lr > 0")
    gen = torch.Generator().manual_seed(seed)
    images = images.float()
    weight = torch.nn.Parameter(torch.randn(n, images.shape[1], generator=gen))
    beta = torch.nn.Parameter(torch.tensor(theory.fit_beta(n, d)), requires_grad=learn_beta)
    opt = torch.optim.Adam([weight, beta] if learn_beta else [weight], lr=lr)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=gen)
        for start in range(0, len(order), batch_size):
            target = images[order[start : start + batch_size]]  # (B, D)
            cos = min_cosine + (1 - min_cosine) * torch.rand(len(target), generator=gen)
            query, _ = perturb_images(target, cos, gen)
            keys = _unit(images @ weight.T)  # (m, n)
            attn = torch.softmax(beta * (_unit(query @ weight.T) @ keys.T), dim=1)  # (B, m)
            loss = ((attn @ images - target) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return Projection(weight.detach(), losses, beta.item() if learn_beta else None)


def _memory(algorithm: str, keys: torch.Tensor, d: int, r: float | None, resolution: int, seed: int):
    """The memory of the projected ``keys`` whose ``weights(addresses)`` (B, m) weigh the stored images."""
    if algorithm == "binary_sdm":
        return mem.PatternSDM(keys, d, r, binary=False, seed=seed)
    if algorithm == "cap_sdm":
        return mem.CapSDM(keys, d, r, resolution, seed=seed)
    if algorithm in ("binary_attention", "cap_attention"):
        return mem.SoftmaxAttention.sdm_fitted(keys, d, binary=False, cap=algorithm == "cap_attention")
    raise ValueError(f"unknown algorithm {algorithm!r}; choose from {ALGORITHMS}")


def recall_images(
    projection: Projection, images: torch.Tensor, queries: torch.Tensor, algorithm: str, d: int,
    r: float | None = None, max_steps: int = 10, tol: float = 1e-6, resolution: int = 1001, seed: int = 0,
) -> torch.Tensor:
    """Iterate reads of the memory of ``images`` (m, D) from ``queries`` (B, D); returns converged (B, D)."""
    keys = projection.address(images.float())
    memory = _memory(algorithm, keys, d, r, resolution, seed)
    q = queries.float()
    for _ in range(max_steps):
        w = memory.weights(projection.address(q)).double()  # (B, m)
        total = w.sum(1, keepdim=True)
        new = torch.where(total > 0, (w @ images.double()) / total.clamp_min(1e-300), q.double()).float()
        moved = (new - q).abs().max() > tol
        q = new
        if not moved:
            break
    return q


def recall_table(
    projection: Projection, images: torch.Tensor, cosines: Sequence[float], algorithms: Sequence[str], d: int,
    r: float | None = None, num_queries: int = 256, seed: int = 0, resolution: int = 1001,
) -> list[dict]:
    """Mean cosine of the recalled image to the original, per algorithm and perturbation cosine, over the first
    ``num_queries`` images; also the fraction of queries still closest to their own image and, as a floor any
    useful read must beat, the mean cosine of the originals with the average stored image (a read that returns
    the mean image scores this whatever the query)."""
    originals = images[:num_queries].float()
    mean_image = float((_unit(originals) @ _unit(images.float().mean(0))).mean())
    rows = []
    for c in cosines:
        query, closest = perturb_images(originals, float(c), torch.Generator().manual_seed(seed + 1))
        for algo in algorithms:
            out = recall_images(projection, images, query, algo, d, r, resolution=resolution, seed=seed)
            sims = (_unit(out) * _unit(originals)).sum(1)
            rows.append({"algorithm": algo, "d": d, "r": r, "cosine": float(c), "mean_similarity": float(sims.mean()),
                         "still_closest": float(closest.float().mean()), "mean_image_similarity": mean_image})
    return rows


def run_projections(
    radii: Sequence[int], n: int = 64, epochs: int = 20, lr: float = 1e-2, cosines: Sequence[float] = (0.9, 0.8, 0.7, 0.6, 0.5),
    r: float | None = None, num_queries: int = 256, seed: int = 0, resolution: int = 1001, progress=None,
) -> list[dict]:
    """The whole experiment on the embedded digits: per radius, learn W on the training split, then recall
    (each algorithm) on the training and test splits; a random W (same seed, untrained) is the control."""
    train, test = digits_images("train"), digits_images("test")
    rows = []
    for d in radii:
        learned = learn_projection(train, n=n, d=d, epochs=epochs, lr=lr, seed=seed)
        control = Projection(torch.randn(n, train.shape[1], generator=torch.Generator().manual_seed(seed)), [])
        for name, proj in (("learned", learned), ("random", control)):
            for split, images in (("train", train), ("test", test)):
                for row in recall_table(proj, images, cosines, ALGORITHMS, d, r, num_queries, seed, resolution):
                    rows.append({"projection": name, "split": split, **row,
                                 "final_loss": learned.losses[-1] if name == "learned" else None})
        if progress:
            progress(f"d={d}: done (final training loss {learned.losses[-1]:.3f})")
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One line per (projection, split, algorithm, d): mean recall cosine per perturbation cosine."""
    cosines = sorted({r["cosine"] for r in rows}, reverse=True)
    head = "| projection | split | algorithm | d | " + " | ".join(f"cos {c:g}" for c in cosines) + " |"
    lines = [head, "|" + "---|" * (4 + len(cosines))]
    keys: dict = {}
    for r in rows:
        keys.setdefault((r["projection"], r["split"], r["algorithm"], r["d"]), {})[r["cosine"]] = r["mean_similarity"]
    for (proj, split, algo, d), vals in keys.items():
        lines.append(f"| {proj} | {split} | {algo} | {d} | " + " | ".join(f"{vals[c]:.3f}" for c in cosines) + " |")
    closest = {}
    for r in rows:
        closest.setdefault((r["split"], r["cosine"]), r["still_closest"])
    lines.append("\nPerturbed queries still closest to their own image: " + ", ".join(
        f"{split} cos {c:g}: {v:.2f}" for (split, c), v in sorted(closest.items())))
    floor = {r["split"]: r["mean_image_similarity"] for r in rows}
    lines.append("\nCosine of the images with the mean stored image (what a read returning the average scores): " +
                 ", ".join(f"{split} {v:.3f}" for split, v in sorted(floor.items())))
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path) -> None:
    """One panel per (radius, split): recall cosine vs perturbation cosine; learned solid, random dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radii = sorted({r["d"] for r in rows})
    splits = ["train", "test"]
    fig, axes = plt.subplots(len(splits), len(radii), figsize=(3.6 * len(radii), 6.4), squeeze=False, sharey=True)
    colors = dict(zip(ALGORITHMS, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for i, split in enumerate(splits):
        for j, d in enumerate(radii):
            ax = axes[i, j]
            for algo in ALGORITHMS:
                for proj, style in (("learned", "o-"), ("random", "x--")):
                    pts = sorted((r["cosine"], r["mean_similarity"]) for r in rows
                                 if r["d"] == d and r["split"] == split and r["algorithm"] == algo and r["projection"] == proj)
                    if pts:
                        ax.plot(*zip(*pts), style, color=colors[algo], markersize=3,
                                label=f"{algo} ({proj})" if (i, j) == (0, 0) else None)
            cs = sorted({r["cosine"] for r in rows})
            ax.plot(cs, cs, ":", color="gray", label="no update" if (i, j) == (0, 0) else None)
            floor = next(r["mean_image_similarity"] for r in rows if r["split"] == split)
            ax.axhline(floor, color="black", linestyle="-.", linewidth=0.8,
                       label="mean stored image" if (i, j) == (0, 0) else None)
            ax.set_title(f"{split}, d={d}", fontsize=9)
            ax.set_xlabel("query cosine to its image")
            ax.grid(alpha=0.3)
        axes[i, 0].set_ylabel("recalled cosine")
    fig.legend(loc="lower center", ncol=6, fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def digits_images(split: str = "train", seed: int = 0) -> torch.Tensor:
    """The embedded digits (scikit-learn's 8x8) of one split as (M, 64) pixel vectors in [0, 1]."""
    from ..data.digits import digits_arrays

    x, _ = digits_arrays(split_seed=seed)[split]
    return torch.as_tensor(np.asarray(x, dtype=np.float32))
