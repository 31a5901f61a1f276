"""Associative memories and the recall experiment runner."""

import math

import pytest
import torch

from columnformer.sdm import memories as mem
from columnformer.sdm import recall, theory


@pytest.fixture(scope="module")
def patterns():
    return mem.random_binary_patterns(1024, 64, seed=0)


def _recall(memory, originals, k, seed=1):
    return float(mem.recall_similarity(memory, originals, mem.flip_bits(originals, k, seed)).mean())


def test_flip_bits_flips_exactly_k():
    x = mem.random_binary_patterns(16, 64, seed=3)
    for k in (0, 1, 12, 64):
        assert torch.all((mem.flip_bits(x, k, seed=k) != x).sum(1) == k)


def test_perturb_to_cosine_hits_target():
    x = mem.random_continuous_patterns(16, 64, seed=0)
    for c in (1.0, 0.8, 0.0):
        assert torch.allclose(mem.similarity(mem.perturb_to_cosine(x, c), x), torch.full((16,), c), atol=1e-5)


@pytest.mark.parametrize("d", [9, 15, 20])
def test_fitted_attention_tracks_pattern_sdm(patterns, d):
    originals = patterns[:64]
    sdm = mem.PatternSDM(patterns, d)
    att = mem.SoftmaxAttention.sdm_fitted(patterns, d)
    for k in (0, 3, 6):
        s_sdm, s_att = _recall(sdm, originals, k), _recall(att, originals, k)
        assert abs(s_sdm - s_att) < 0.03, (d, k, s_sdm, s_att)
        assert s_sdm > 0.97  # both actually clean up the perturbation here
        assert s_sdm > 1 - 2 * k / 64 or k == 0


def test_pattern_sdm_no_intersection_leaves_query():
    # d = 5: balls 12 bits apart do not intersect, so nothing is read and the query stays
    x = mem.random_binary_patterns(256, 64, seed=2)
    assert _recall(mem.PatternSDM(x, 5), x[:32], 12) == pytest.approx(1 - 2 * 12 / 64)
    assert _recall(mem.SoftmaxAttention.sdm_fitted(x, 5), x[:32], 12) == pytest.approx(1.0)


def test_neuron_sdm_recalls_where_neurons_activate(patterns):
    memory = mem.NeuronSDM(patterns[:256], d=20, r=20_000, seed=0)
    expected = 20_000 * theory.hamming_radius_to_fraction(20, 64)
    assert memory.neurons_per_pattern == pytest.approx(expected, rel=0.1)
    assert _recall(memory, patterns[:64], 0) == 1.0
    assert _recall(memory, patterns[:64], 4) > 0.97


def test_hopfield_capacity():
    small = mem.random_binary_patterns(4, 64, seed=5)
    assert _recall(mem.Hopfield(small), small, 6) == 1.0
    big = mem.random_binary_patterns(1024, 64, seed=5)
    assert _recall(mem.Hopfield(big), big[:64], 0) < 0.6  # far beyond ~0.14 n patterns


def test_continuous_memories():
    x = mem.random_continuous_patterns(256, 64, seed=1)
    q = mem.perturb_to_cosine(x[:32], 0.75, seed=2)
    sdm = mem.converge(mem.PatternSDM(x, 15, binary=False), q).queries
    att = mem.converge(mem.SoftmaxAttention.sdm_fitted(x, 15, binary=False), q).queries
    tra = mem.converge(mem.SoftmaxAttention.transformer(x, binary=False), q).queries
    assert mem.similarity(sdm, x[:32]).mean() > 0.99
    assert mem.similarity(att, x[:32]).mean() > 0.99
    # beta = 1/sqrt(n) on unit vectors: near-uniform weights collapse every query to the mean
    assert mem.similarity(tra, x[:32]).mean() < 0.5


def test_memory_input_errors():
    with pytest.raises(ValueError, match="shape \\(m, n\\)"):
        mem.PatternSDM(torch.ones(64), 5)
    with pytest.raises(ValueError, match="0 <= d <= n"):
        mem.NeuronSDM(mem.random_binary_patterns(4, 16), d=17, r=10)
    with pytest.raises(ValueError, match="bit flips"):
        mem.flip_bits(mem.random_binary_patterns(4, 16), 17)
    with pytest.raises(ValueError, match="only \\{0,1\\}"):
        mem.Hopfield(torch.full((3, 8), 0.5))


def test_recall_runner_outputs_and_skips(tmp_path):
    config = recall.RecallConfig(
        m=128, num_queries=32, perturbations=(0, 4), probabilities=(1e-13, 1e-3), neurons=20_000
    )
    result = recall.run_recall(config)
    skipped = {(s["algorithm"], s["d"]) for s in result.skipped}
    assert skipped == {("neuron_sdm", 5)}
    assert "expected neurons" in result.skipped[0]["reason"]
    # 3 radius-dependent algorithms x 2 radii + neuron_sdm x 1 + 2 radius-free, x 2 perturbations
    assert len(result.rows) == (3 * 2 + 1 + 2) * 2
    row = next(r for r in result.rows if r["algorithm"] == "sdm_attention" and r["d"] == 5 and r["perturbation"] == 4)
    assert row["beta"] == pytest.approx(35.48, abs=0.01) and row["mean_similarity"] == 1.0
    paths = recall.save_outputs(result, tmp_path, 64)
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert "| pattern_sdm_inf | 5 |" in paths["markdown"].read_text()


def test_recall_config_validation():
    with pytest.raises(ValueError, match="unknown algorithms"):
        recall.RecallConfig(algorithms=("nope",))
    with pytest.raises(ValueError, match="activation probabilities"):
        recall.RecallConfig(probabilities=(0.0,))


def test_cap_sdm_weights_are_the_cap_intersection_at_the_grid_cosine():
    n, d, res = 24, 6, 201
    pats = mem.random_continuous_patterns(12, n, seed=5)
    queries = mem.perturb_to_cosine(pats[:4], 0.7, seed=6)
    sdm = mem.CapSDM(pats, d, None, resolution=res)
    w = sdm.weights(queries)  # (4, 12), relative: the largest is 1
    cos = (queries / queries.norm(dim=1, keepdim=True)) @ (pats / pats.norm(dim=1, keepdim=True)).T
    for b in range(4):
        grid = [-1 + 2 * math.floor((c + 1) / 2 * (res - 1) + 1e-9) / (res - 1) for c in cos[b].tolist()]
        log_i = theory.log_cap_intersection(n, d, [min(g, 1 - 1e-12) for g in grid])
        expect = torch.tensor([math.exp(v - max(log_i)) if v > -math.inf else 0.0 for v in log_i])
        assert torch.allclose(w[b].float(), expect.float(), rtol=1e-6, atol=1e-30)
    assert (w > 0).sum() < w.numel()  # far patterns (caps that do not meet) weigh exactly 0
    # finite neurons: stochastic rounding of r * fraction, unbiased over reads
    r = 1e6
    finite = mem.CapSDM(pats, d, r, resolution=res, seed=1)
    exact = torch.exp(finite.log_table[torch.floor((cos[:1].double().clamp(-1, 1) + 1) / 2 * (res - 1) + 1e-9).long()])
    reads = torch.stack([finite.weights(queries[:1]) for _ in range(400)]).mean(0)
    one = finite.weights(queries[:1])
    assert torch.all(one == torch.floor(one))  # whole neurons
    big = exact > 0.5
    assert torch.allclose(reads[big], exact[big], rtol=0.1)


def test_cap_memories_in_the_recall_runner():
    cfg = recall.RecallConfig(n=24, m=64, num_queries=16, perturbations=(0, 6), probabilities=(1e-3, 1e-2),
                              algorithms=("cap_sdm_inf", "cap_sdm_finite", "cap_attention"), continuous=True,
                              neurons=10**6, cap_resolution=201)
    result = recall.run_recall(cfg)
    algos = {row["algorithm"] for row in result.rows}
    assert algos == {"cap_sdm_inf", "cap_sdm_finite", "cap_attention"}
    d = theory.fraction_to_hamming_radius(1e-3, 24)
    beta = next(r["beta"] for r in result.rows if r["algorithm"] == "cap_attention" and r["d"] == d)
    assert beta == pytest.approx(theory.fit_beta(24, d, continuous=True))
    assert beta != pytest.approx(theory.fit_beta(24, d))  # the cap fit, not the binary one
    moved = [r for r in result.rows if r["algorithm"] == "cap_sdm_inf" and r["perturbation"] == 6]
    assert all(r["mean_similarity"] > 1 - 2 * 6 / 24 + 0.05 for r in moved)  # it cleans up perturbed queries
    binary = recall.run_recall(recall.RecallConfig(n=24, m=16, num_queries=4, perturbations=(0,),
                                                   probabilities=(1e-3,), algorithms=("cap_sdm_inf",)))
    assert not binary.rows and "continuous data only" in binary.skipped[0]["reason"]
