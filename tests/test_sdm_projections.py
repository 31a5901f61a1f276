"""Learned projections of the digits into the SDM address space (the original's LearnProjections)."""

import pytest
import torch

from columnformer.sdm import projections as P


@pytest.fixture(scope="module")
def train():
    return P.digits_images("train")


def test_perturbation_hits_the_cosine_and_reports_the_closest_image(train):
    x = train[:64]
    out, closest = P.perturb_images(x, 0.8, torch.Generator().manual_seed(0))
    cos = (out * x).sum(1) / (out.norm(dim=1) * x.norm(dim=1))
    assert torch.allclose(cos, torch.full_like(cos, 0.8), atol=1e-5)
    assert torch.allclose(out.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    for i in range(64):  # closest: no other image has a larger cosine with the perturbed query
        sims = [float(out[i] @ x[j] / (out[i].norm() * x[j].norm())) for j in range(64)]
        assert bool(closest[i]) == (max(range(64), key=sims.__getitem__) == i)
    assert 0.5 < closest.float().mean() < 1  # digits of a class are similar: some queries drift to a neighbour
    twins = torch.cat([x[:1], x[:1] * 1.0001])  # two (almost) identical images: one of them cannot be closest
    _, flags = P.perturb_images(twins, 0.999, torch.Generator().manual_seed(1))
    assert flags.sum() == 1


def test_learned_projection_recalls_better_than_a_random_one(train):
    n, d = 32, 7
    learned = P.learn_projection(train, n=n, d=d, epochs=4, lr=1e-2, seed=0)
    assert sum(learned.losses[-5:]) < 0.8 * sum(learned.losses[:5])
    control = P.Projection(torch.randn(n, 64, generator=torch.Generator().manual_seed(0)), [])
    memory = train[:300]
    row = {}
    for name, proj in (("learned", learned), ("random", control)):
        row[name] = P.recall_table(proj, memory, [0.7], ["binary_attention"], d, num_queries=64)[0]["mean_similarity"]
    assert row["learned"] > row["random"] + 0.03, row
    assert row["learned"] > 0.7 + 0.1  # the read moves queries towards their images


def test_recall_without_neurons_leaves_the_query_and_algorithms_differ(train):
    proj = P.Projection(torch.randn(16, 64, generator=torch.Generator().manual_seed(2)), [])
    memory, queries = train[:50], train[50:54]
    same = P.recall_images(proj, memory, queries, "binary_sdm", d=2, r=1e-9)  # ~0 neurons: nothing read
    assert torch.equal(same, queries)
    a = P.recall_images(proj, memory, queries, "binary_attention", d=5, max_steps=1)
    b = P.recall_images(proj, memory, queries, "cap_attention", d=5, max_steps=1)
    assert not torch.allclose(a, b)  # different betas (binary vs cap fit)
    with pytest.raises(ValueError, match="unknown algorithm"):
        P.recall_images(proj, memory, queries, "hopfield", d=5)


def test_beta_learned_with_the_projection_moves_and_fixed_beta_does_not(train):
    fixed = P.learn_projection(train[:256], n=16, d=4, epochs=1, lr=5e-2, seed=0)
    learned = P.learn_projection(train[:256], n=16, d=4, epochs=1, lr=5e-2, seed=0, learn_beta=True)
    assert fixed.beta is None
    start = P.theory.fit_beta(16, 4)
    assert learned.beta is not None and abs(learned.beta - start) > 1e-3
    assert not torch.equal(fixed.weight, learned.weight)  # a different beta changes the projection's updates


def test_mean_image_floor_is_reported():
    proj = P.Projection(torch.randn(16, 64, generator=torch.Generator().manual_seed(3)), [])
    memory = P.digits_images("test")[:100]
    row = P.recall_table(proj, memory, [0.8], ["binary_attention"], d=5, num_queries=20)[0]
    unit = memory / memory.norm(dim=1, keepdim=True)
    mean = memory.mean(0) / memory.mean(0).norm()
    assert row["mean_image_similarity"] == pytest.approx(float((unit[:20] @ mean).mean()), rel=1e-5)
    assert 0.7 < row["mean_image_similarity"] < 0.95  # digits are positive images, all close to their mean
