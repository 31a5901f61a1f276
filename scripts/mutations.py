"""Mutation audit (not run in CI): break the code on purpose and show that the named test goes red.

    .venv/bin/python scripts/mutations.py            # all mutations, ~2 min on 2 cores
    .venv/bin/python scripts/mutations.py --list

Each mutation is applied to a fresh copy of the committed tree (``git archive HEAD``) in a temporary folder;
the named tests run there with that copy's ``src`` first on ``PYTHONPATH``. First, as a control, every test
selection must pass on the unmutated copy; then a mutation is *caught* when its tests fail. The script exits
1 if any mutation survives, 2 if the control fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, file, original text, mutated text, pytest selection)
MUTATIONS = [
    ("optimizer step removed", "src/columnformer/train.py",
     "                self.optimizer.step()\n", "                pass\n", ["tests/test_learning.py"]),
    ("scheduler not restored on resume", "src/columnformer/train.py",
     '            self.scheduler.load_state_dict(state["scheduler"])\n', "            pass\n",
     ["tests/test_train.py", "-k", "in_process_resume"]),
    ("validation split taken from train", "src/columnformer/data/digits.py",
     '"val": (x_val, y_val)', '"val": (x_train[:180], y_train[:180])', ["tests/test_splits.py"]),
    ("deferred weight gradient keeps only the first step", "src/columnformer/layers.py",
     "            acc.baddbmm_(xt, p)\n", "            pass\n", ["tests/test_layers_fast.py"]),
    ("deferred weight gradient pairs x rows with other samples' g", "src/columnformer/layers.py",
     "        xt = x.transpose(1, 2)  # (N, in, B)\n",
     "        xt = x.flip(1).transpose(1, 2)  # (N, in, B)\n", ["tests/test_layers_fast.py"]),
    ("classifier LayerNorm after pooling in the predecessor presets", "src/columnformer/vision.py",
     '        if self.norm_order == "tokens":\n            x = self.norm(x)', '        if False:\n            x = self.norm(x)',
     ["tests/test_predecessor.py", "-k", "logits"]),
    ("predecessor geometry without its depth offset", "src/columnformer/geometry.py",
     "gap=depth_offset if len(shapes) == 1 else 0.0", "gap=0.0", ["tests/test_predecessor.py", "-k", "geometry"]),
    ("untied weights imported without the transpose", "src/columnformer/predecessor.py",
     "                value = value.transpose(1, 2)  # (N, out, in) -> (N, in, out)\n", "                pass\n",
     ["tests/test_predecessor.py", "-k", "logits"]),
    ("runtime errors reported as bad input", "src/columnformer/cli.py",
     '        print(f"error ({type(exc).__name__}): {exc}", file=sys.stderr)\n        return EXIT_RUNTIME',
     '        print(f"error ({type(exc).__name__}): {exc}", file=sys.stderr)\n        return EXIT_INPUT',
     ["tests/test_exit_codes.py"]),
    ("a stale analysis.json reused", "src/columnformer/analysis/analyze.py",
     '    made = data.get("made_from")\n', '    return None\n    made = data.get("made_from")\n',
     ["tests/test_stale_analysis.py"]),
    ("block kernel: key gradients scattered to the wrong columns", "src/columnformer/block_sparse.py",
     "dk.index_add_(0, ch.keys, dkb.view(", "dk.index_add_(0, ch.keys.flip(0), dkb.view(", ["tests/test_block_sparse.py"]),
    ("block kernel: wiring gradient dropped", "src/columnformer/block_sparse.py",
     "index_add_(1, local, (gw * tiles.w_block[e0:e1])", "index_add_(1, local, 0 * (gw * tiles.w_block[e0:e1])",
     ["tests/test_block_sparse.py"]),
    ("flex backend: edges looked up in unlisted key tiles", "src/columnformer/flex_sparse.py",
     "        return torch.where(hit, e, -1)\n", "        return e\n", ["tests/test_flex_sparse.py"]),
    ("flex backend: tile outputs merged without their log-sum-exp weight", "src/columnformer/flex_sparse.py",
     "out = out_t * torch.exp(lse_t - lse)[..., None] +", "out = out_t +", ["tests/test_flex_sparse.py"]),
    ("flex backend: gathered edges without their bias", "src/columnformer/flex_sparse.py",
     "g_bias = bias.gather(1, plan.g_edge) if bias is not None else None", "g_bias = None",
     ["tests/test_flex_sparse.py"]),
    ("flex backend: wiring heads without the wiring weights", "src/columnformer/flex_sparse.py",
     "        return s + torch.where(h % 2 == 1, edge_bias(q_idx, kv_idx, logw_flat), 0.0)\n",
     "        return s\n", ["tests/test_flex_sparse.py"]),
    ("flex backend: output read from the wiring heads", "src/columnformer/flex_sparse.py",
     "out_t, lse_t, lse_w = out2[:, 0::2], lse2[:, 0::2], lse2[:, 1::2]",
     "out_t, lse_t, lse_w = out2[:, 1::2], lse2[:, 0::2], lse2[:, 1::2]", ["tests/test_flex_sparse.py"]),
    ("flex backend: checkpointing not refused", "src/columnformer/sheet.py",
     'if self.sparse_kernel == "flex" and self.checkpoint:', "if False:", ["tests/test_flex_sparse.py"]),
    ("flex backend: entropy of the gathered edges dropped", "src/columnformer/flex_sparse.py",
     "            ent_rows = ent_rows + (a_g *", "            ent_rows = ent_rows + 0 * (a_g *", ["tests/test_flex_sparse.py"]),
    ("sheet: flex plan not used where FlexAttention runs", "src/columnformer/sheet.py",
     "                build = build_flex_plan\n", "                build = build_block_plan\n",
     ["tests/test_flex_sparse.py", "-k", "sheet"]),
    ("fused kernel: no value gradient from the source pass", "src/columnformer/csrc/fused_sparse.cpp",
     "        if (dvs) lane_axpy<T, DV>(ar, gn, dvs, dv, BH);\n", "", ["tests/test_fused_sparse.py"]),
    ("fused kernel: padding lanes counted in the bias gradient", "src/columnformer/csrc/fused_sparse.cpp",
     "  for (int64_t h = 0; h < lanes; ++h) {  // padding lanes are not counted\n    sb",
     "  for (int64_t h = 0; h < P; ++h) {  // padding lanes are not counted\n    sb",
     ["tests/test_fused_sparse.py"]),
    ("fused kernel: wiring without the wiring weights", "src/columnformer/csrc/fused_sparse.cpp",
     "      acc_w += x * E.W[n * K + es[j]];\n", "      acc_w += x;\n", ["tests/test_fused_sparse.py"]),
    ("fused kernel: every lane block of the values weighted by the first block's probabilities",
     "src/columnformer/csrc/fused_sparse.cpp",
     "for (int t = 0; t < RB; ++t) acc[t] += vload(cj + ((v0 + t) & mask) * W) * vload(x + t * W);",
     "for (int t = 0; t < RB; ++t) acc[t] += vload(cj) * vload(x + t * W);", ["tests/test_fused_sparse.py"]),
    ("fused kernel: key gradient without the softmax's mean term", "src/columnformer/csrc/fused_sparse.cpp",
     "c[h] = ar[h] * (dae[h] + gwe - Dn[h]) * scale;", "c[h] = ar[h] * (dae[h] + gwe) * scale;",
     ["tests/test_fused_sparse.py"]),
    ("fused kernel: wiring gradient not divided by the lanes", "src/columnformer/fused_sparse.py",
     "gw = float(g_wiring) / (N * BH)", "gw = float(g_wiring) / N", ["tests/test_fused_sparse.py"]),
    ("column ops: weight gradients of later steps overwrite the earlier ones", "src/columnformer/csrc/column_ops.cpp",
     "dwp[p] + n * I * width[p], width[p], accumulate,", "dwp[p] + n * I * width[p], width[p], false,",
     ["tests/test_column_ops.py"]),
    ("column ops: the first use's bias gradient added to whatever the buffer held", "src/columnformer/csrc/column_ops.cpp",
     "            if (!accumulate) std::fill(dbn, dbn + O, scalar_t(0));\n", "", ["tests/test_column_ops.py"]),
    ("host cache: freed blocks are never reused", "src/columnformer/csrc/host_cache.cpp",
     "if (it != free_blocks.end() && it->first <= size + size / 4) {", "if (false) {", ["tests/test_host_cache.py"]),
    ("host cache: a new block takes no pages from cached blocks", "src/columnformer/csrc/host_cache.cpp",
     "while (done < size && !free_blocks.empty()) {", "while (false) {", ["tests/test_host_cache.py"]),
    ("host cache: the rest of a donor block is dropped from the cache", "src/columnformer/csrc/host_cache.cpp",
     "        free_blocks.emplace(d - m, donor);\n", "", ["tests/test_host_cache.py"]),
    ("host cache: a block twice the size serves a request", "src/columnformer/csrc/host_cache.cpp",
     "it->first <= size + size / 4", "it->first <= 2 * size", ["tests/test_host_cache.py"]),
    ("column ops: an 8 x 8 transpose mixes up its 128-bit halves", "src/columnformer/csrc/column_ops.cpp",
     "vstore(dst + i * ldd, __builtin_shuffle(u[i], u[i + 4], vmask{0, 1, 2, 3, 8, 9, 10, 11}));",
     "vstore(dst + i * ldd, __builtin_shuffle(u[i], u[i + 4], vmask{0, 1, 2, 3, 12, 13, 14, 15}));",
     ["tests/test_column_ops.py"]),
    ("column ops: layer-norm weight gradient without the normalised input", "src/columnformer/csrc/column_ops.cpp",
     "            sw[c] += gr[c] * xh[c];\n", "            sw[c] += gr[c];\n", ["tests/test_column_ops.py"]),
    ("column ops: layer-norm input gradient without its projection on the normalised input",
     "src/columnformer/csrc/column_ops.cpp", "            m2 += gh[c] * xh[c];\n", "            m2 += 0;\n",
     ["tests/test_column_ops.py"]),
    ("column ops: the layers never use the C++ kernels", "src/columnformer/layers.py",
     "    return native.load()\n", "    return None\n", ["tests/test_column_ops.py"]),
    ("fused kernel layout: queries read with the wrong row stride", "src/columnformer/csrc/column_ops.cpp",
     "        transpose(xp + n * sn, R, d, sr, on, P);", "        transpose(xp + n * sn, R, d, d, on, P);",
     ["tests/test_fused_sparse.py"]),
    ("one-pass backward: blocks coloured without looking at their sources", "src/columnformer/csrc/fused_sparse.cpp",
     "        if (vp == nullptr || vp[n * K + e]) taken |= used[ip[n * K + e]];",
     "        if (vp == nullptr || vp[n * K + e]) taken |= 0 * used[ip[n * K + e]];",
     ["tests/test_fused_sparse.py", "-k", "one_pass"]),
    ("one-pass backward: dk from the key row instead of the reader's query", "src/columnformer/csrc/fused_sparse.cpp",
     "    if (dkp) lane_axpy<T, D>(c, qn, dkp + src[e] * d * BH, d, BH);",
     "    if (dkp) lane_axpy<T, D>(c, kp + src[e] * d * BH, dkp + src[e] * d * BH, d, BH);",
     ["tests/test_fused_sparse.py", "-k", "one_pass"]),
    ("one-pass backward: dv weighted by dA instead of A", "src/columnformer/csrc/fused_sparse.cpp",
     "    if (dvp) lane_axpy<T, DV>(ae, gn, dvp + src[e] * dv * BH, dv, BH);",
     "    if (dvp) lane_axpy<T, DV>(dae, gn, dvp + src[e] * dv * BH, dv, BH);",
     ["tests/test_fused_sparse.py", "-k", "one_pass"]),
    ("one-pass backward: never taken by auto", "src/columnformer/fused_sparse.py",
     '    if BACKWARD == "two_pass":\n        return None', '    if True:\n        return None',
     ["tests/test_fused_sparse.py", "-k", "one_pass or auto_takes"]),
    ("reader groups: duplicate edges of one reader overwrite instead of adding", "src/columnformer/csrc/fused_sparse.cpp",
     "for (int64_t h = 0; h < P; h += W) vstore(dst + h, vload(dst + h) + vload(a.data() + j * P + h));",
     "for (int64_t h = 0; h < P; h += W) vstore(dst + h, vload(a.data() + j * P + h));",
     ["tests/test_fused_sparse.py", "-k", "groups and duplicate"]),
    ("reader groups: dk, dv scattered from the first reader of each group only", "src/columnformer/csrc/fused_sparse.cpp",
     "      for (int r = 0; r < rc; ++r) acc += vload(c + r * cs + u * P + cb) * vload(xs[r] + t * W);",
     "      for (int r = 0; r < 1; ++r) acc += vload(c + r * cs + u * P + cb) * vload(xs[r] + t * W);",
     ["tests/test_fused_sparse.py", "-k", "groups"]),
    ("reader groups: the full-group scatter drops the fourth reader", "src/columnformer/csrc/fused_sparse.cpp",
     "(c2 * vload(xs[2] + t * W) + c3 * vload(xs[3] + t * W))));", "(c2 * vload(xs[2] + t * W))));",
     ["tests/test_fused_sparse.py", "-k", "groups"]),
    ("reader groups: the second partial sum of the dot products dropped", "src/columnformer/csrc/fused_sparse.cpp",
     "vstore(out + r * stride + b, acc[0][r] + acc[1][r]);", "vstore(out + r * stride + b, acc[0][r]);",
     ["tests/test_fused_sparse.py", "-k", "groups"]),
    ("whole-sheet input area: inject=every drops the input after the first step", "src/columnformer/sheet.py",
     "h = h + inp if self._input_is_sheet else", "h = h if self._input_is_sheet else",
     ["tests/test_model.py", "-k", "whole_sheet"]),
    ("MLP: recompute ignored (hidden activations stored)", "src/columnformer/layers.py",
     "        if (self.recompute and session is not None", "        if (False and session is not None",
     ["tests/test_layers_fast.py", "-k", "recomputed_mlp"]),
    ("MLP: recomputed fc2 weight gradient from the pre-activation, not the GELU output", "src/columnformer/layers.py",
     "        da = _use_backward(a, w2, g, stash2,", "        da = _use_backward(h, w2, g, stash2,",
     ["tests/test_layers_fast.py", "-k", "recomputed_mlp"]),
    ("trainer: torch's AdamW without its fused kernel", "src/columnformer/train.py",
     "betas=cfg.optim.betas, fused=fused or None)", "betas=cfg.optim.betas)", ["tests/test_optim.py"]),
    ("huge-pages environment without the tunable", "src/columnformer/runtime.py",
     'env["GLIBC_TUNABLES"] = ":".join(current + [HUGE_PAGES_TUNABLE])', 'env["GLIBC_TUNABLES"] = ":".join(current)',
     ["tests/test_host_memory.py"]),
    ("sheet: auto never picks the fused kernel", "src/columnformer/sheet.py",
     'fused = kernel == "fused" or (kernel == "auto" and device.type == "cpu" and fused_available())',
     'fused = kernel == "fused"', ["tests/test_fused_sparse.py", "-k", "auto"]),
    ("keep_host_memory leaves large blocks to mmap", "src/columnformer/runtime.py",
     "return mallopt(m_mmap_max, 0) == 1", "return mallopt(m_mmap_max, 65536) == 1", ["tests/test_host_memory.py"]),
    ("trainer ignores train.keep_host_memory", "src/columnformer/train.py",
     "self.host_memory_kept = keep_host_memory() if tc.keep_host_memory else False",
     "self.host_memory_kept = False", ["tests/test_host_memory.py"]),
    ("factory reads ModelConfig from the run config (a 4-module import cycle)", "src/columnformer/factory.py",
     "from .model_config import ModelConfig", "from .config import ModelConfig", ["tests/test_architecture.py"]),
    ("activation checkpointing option ignored", "src/columnformer/sheet.py",
     "if self.cfg.checkpoint and torch.is_grad_enabled():", "if False:",
     ["tests/test_block_sparse.py", "-k", "checkpointing"]),
    ("retinotopic map wraps instead of scaling", "src/columnformer/config.py",
     "ty = np.arange(h) * gh // h", "ty = np.arange(h) % gh", ["tests/test_block_sparse.py", "-k", "wide_preset"]),
    ("README command with a wrong option", "README.md",
     "probe runs/mim --labels-fraction 0.1 --at-init", "probe runs/mim --label-fraction 0.1 --at-init",
     ["tests/test_readme.py"]),
    ("data loaded before the model is built", "src/columnformer/train.py",
     "        self.model = self.task.build_model()  # before the data",
     "        self.data_sets = build_datasets(cfg.data, cfg.model, seed=tc.seed)\n"
     "        self.model = self.task.build_model()  # before the data",
     ["tests/test_messages.py", "-k", "geometry"]),
    ("one-class training set not warned", "src/columnformer/tasks/classify.py",
     "        if len(present) >= 2:\n", "        if True:\n", ["tests/test_messages.py", "-k", "one_class"]),
    ("missing hf extra as a bare ImportError", "src/columnformer/extras.py",
     "        raise MissingExtraError(", "        raise ImportError(", ["tests/test_messages.py", "-k", "hf_extra"]),
    ("scalar section blamed on the override", "src/columnformer/config.py",
     'else "the config file (or its preset)")', 'else f"override {item!r}")',
     ["tests/test_messages.py", "-k", "scalar"]),
    ("carved val split overlaps the carved test split", "src/columnformer/data/images.py",
     '"val": np.sort(order[n_test : n_test + n_val])', '"val": np.sort(order[:n_val])',
     ["tests/test_data.py", "-k", "disjoint"]),
    ("data.augment=false ignored for image files", "src/columnformer/data/transforms.py",
     "    if not data_cfg.augment:\n        return ev, ev\n", "", ["tests/test_data.py", "-k", "augment_false"]),
    ("crop scale range ignored (area up to the whole image)", "src/columnformer/data/transforms.py",
     "target = area * rng.uniform(scale[0], scale[1])", "target = area * rng.uniform(scale[0], 1.0)",
     ["tests/test_data.py", "-k", "crop_box"]),
    ("analyze --radius ignored", "src/columnformer/analysis/analyze.py",
     "    loc = locality_index(A, dist, opts.radius, mask_arg)", "    loc = locality_index(A, dist, 1.5, mask_arg)",
     ["tests/test_analysis_e2e.py", "-k", "radius"]),
    ("sdm term count misses one term per a", "src/columnformer/sdm/approximations.py",
     "        count += max(0, hi - lo + 1)\n", "        count += max(0, hi - lo)\n",
     ["tests/test_sdm_approximations.py", "-k", "bounds"]),
    ("sdm Jaeckel intersection with C(n - dv, q - 1)", "src/columnformer/sdm/approximations.py",
     "math.log(math.comb(n - dv, q)) - base", "math.log(math.comb(n - dv, q - 1)) - base",
     ["tests/test_sdm_approximations.py", "-k", "jaeckel"]),
    ("sdm read noise without the binomial variance term", "src/columnformer/sdm/approximations.py",
     "(r * p * (1 - p) + (r * p) ** 2)", "((r * p) ** 2)",
     ["tests/test_sdm_approximations.py", "-k", "read_noise"]),
    ("sdm softmax beta fit never steps", "src/columnformer/sdm/approximations.py",
     "        opt.step()\n", "        pass\n", ["tests/test_sdm_approximations.py", "-k", "softmax"]),
    ("sdm cap memory rounds the cosine to the nearest grid point", "src/columnformer/sdm/memories.py",
     "idx = torch.floor((cos + 1) / 2 * (self.resolution - 1) + 1e-9)", "idx = torch.round((cos + 1) / 2 * (self.resolution - 1))",
     ["tests/test_sdm_memories.py", "-k", "grid_cosine"]),
    ("sdm cap attention with the binary beta", "src/columnformer/sdm/memories.py",
     "theory.fit_beta(patterns.shape[1], d, continuous=cap)", "theory.fit_beta(patterns.shape[1], d)",
     ["tests/test_sdm_memories.py", "-k", "recall_runner"]),
    ("sdm learned projection never steps", "src/columnformer/sdm/projections.py",
     "            opt.step()\n            losses.append", "            losses.append",
     ["tests/test_sdm_projections.py", "-k", "learned"]),
    ("sdm perturbed-query closest check compares with the wrong image", "src/columnformer/sdm/projections.py",
     "closest = sims.argmax(1) == torch.arange(b)", "closest = sims.argmax(1) == torch.arange(b).roll(1)",
     ["tests/test_sdm_projections.py", "-k", "closest"]),
    ("sdm learned betas compared with the wrong range end", "src/columnformer/sdm/effective_beta.py",
     '"in_range": float(np.mean((b >= lo) & (b <= hi)))', '"in_range": float(np.mean((b >= lo) & (b <= lo)))',
     ["tests/test_sdm_approximations.py", "-k", "qknorm"]),
    ("sdm critical-distance curve with a wrong ball volume", "src/columnformer/sdm/theory.py",
     "        yield d, _critical_distance(n, d, m, r, volume, noise)", "        yield d, _critical_distance(n, d, m, r, volume // 2, noise)",
     ["tests/test_sdm_theory.py", "-k", "curve"]),
    ("feed-forward sheet concatenates its q/k weights", "src/columnformer/sheet.py",
     "        with untied_session(fuse=reused):", "        with untied_session(fuse=True):",
     ["tests/test_layers_fast.py", "-k", "concatenate"]),
    ("static weight bank always materialises per-column matrices", "src/columnformer/mixture.py",
     "    return batch * experts < 2 * (batch + experts)", "    return False",
     ["tests/test_mixture.py", "-k", "materialises"]),
    ("report leaves out the model-brain comparisons", "src/columnformer/analysis/report.py",
     "{brain_sections(run_dir)}\n<h2>Summary</h2>", "\n<h2>Summary</h2>",
     ["tests/test_report.py", "-k", "brain"]),
    ("sdm capacity computed with r = 2.0**n in floats", "src/columnformer/sdm/theory.py",
     "    log_r = log_neuron_count(n, r)\n    z = z_for_whole_pattern(n, prob_whole_pattern)",
     "    log_r = math.log(2.0**n if r is None else r)\n    z = z_for_whole_pattern(n, prob_whole_pattern)",
     ["tests/test_sdm_fuzz.py"]),
    ("sdm --r accepts nan and inf", "src/columnformer/sdm/cli.py",
     "    if not (math.isfinite(value) and value > 0):\n        raise argparse.ArgumentTypeError(f\"must be a finite",
     "    if not (value > 0 or value != value):\n        raise argparse.ArgumentTypeError(f\"must be a finite",
     ["tests/test_sdm_fuzz.py"]),
    ("arithmetic: operand pairs split by ordered pair", "src/columnformer/tasks/arithmetic.py",
     "lo, hi = np.minimum(a, b).astype(np.uint64), np.maximum(a, b).astype(np.uint64)",
     "lo, hi = a.astype(np.uint64), b.astype(np.uint64)", ["tests/test_arithmetic.py", "-k", "two_splits"]),
    ("arithmetic: random_offset ignored", "src/columnformer/tasks/arithmetic.py",
     "if offsets else np.zeros(size", "if False else np.zeros(size", ["tests/test_arithmetic.py", "-k", "offsets"]),
    ("arithmetic: switch ignores its op token", "src/columnformer/tasks/arithmetic.py",
     "[a + b, a - b], a * b)", "[a + b, a + b], a * b)", ["tests/test_arithmetic.py", "-k", "switch"]),
    ("halting: halted columns keep updating", "src/columnformer/sheet.py",
     "x = torch.where(run.unsqueeze(-1), new, x)  # (N, B, C)", "x = new  # (N, B, C)",
     ["tests/test_halting.py", "-k", "keep_their_state"]),
    ("halting: ACT without the remainder", "src/columnformer/sheet.py",
     "w = torch.where(halt_now, 1 - self.cum, torch.where(", "w = torch.where(halt_now, p, torch.where(",
     ["tests/test_halting.py", "-k", "sum_to_one"]),
    ("halting: PonderNet without the survival product", "src/columnformer/sheet.py",
     "            p = lam * self.survive\n", "            p = lam\n", ["tests/test_halting.py", "-k", "formulas"]),
    ("halting: ponder cost left out of the loss", "src/columnformer/train.py",
     "reg = tc.wiring_lambda * wiring + trace.aux_loss", "reg = tc.wiring_lambda * wiring",
     ["tests/test_halting.py", "-k", "trainer"]),
    ("mixture: every column mixes with column 0's coefficients", "src/columnformer/mixture.py",
     "w = (c.to(x.dtype) @ self.weight", "w = (c[:1].expand_as(c).to(x.dtype) @ self.weight",
     ["tests/test_mixture.py", "-k", "untied"]),
    ("mixture: dynamic coefficients paired with other samples", "src/columnformer/mixture.py",
     "y = (c.unsqueeze(-1) * y).sum(2)", "y = (c.flip(1).unsqueeze(-1) * y).sum(2)",
     ["tests/test_mixture.py", "-k", "reference"]),
    ("mixture: top-k ignored", "src/columnformer/mixture.py",
     "if self.top_k is not None and self.top_k < self.experts:", "if False:", ["tests/test_mixture.py", "-k", "top_k"]),
    ("mixture: topographic features at high frequency", "src/columnformer/mixture.py",
     "freqs = np.arange(1, count + 1) * 0.5", "freqs = np.arange(1, count + 1) * 3.5",
     ["tests/test_mixture.py", "-k", "smooth"]),
    ("communication: linmixing wiring cost of signed weights", "src/columnformer/attention.py",
     "mag = weights.float().abs()", "mag = weights.float()", ["tests/test_communication.py", "-k", "every_mode"]),
    ("communication: selection without its static query", "src/columnformer/attention.py",
     "return self.query.to(k.dtype).unsqueeze(1).expand(N, B, H, d), k", "return torch.zeros_like(k), k",
     ["tests/test_communication.py", "-k", "every_mode"]),
    ("predecessor mixture weights imported with in and out swapped", "src/columnformer/predecessor.py",
     "value = value.permute(2, 1, 0) if value.ndim == 3", "value = value.permute(2, 0, 1) if value.ndim == 3",
     ["tests/test_predecessor.py", "-k", "logits and tut"]),
    ("linmixing per-head weights ignored", "src/columnformer/attention.py",
     "weights = self.bias if self.head_bias is None else self.bias + self.head_bias", "weights = self.bias",
     ["tests/test_predecessor.py", "-k", "logits and moemixer"]),
    ("features: every chunk written at the first rows", "src/columnformer/brain/features.py",
     "feats[row : row + len(x)] = x.numpy()", "feats[: len(x)] = x.numpy()", ["tests/test_features.py", "-k", "trace"]),
    ("features: all chunks held in memory, written at the end", "src/columnformer/brain/features.py",
     "        feats[row : row + len(x)] = x.numpy()\n        row += len(x)\n",
     "        held = locals().setdefault('held', [])\n        held.append(x.numpy())\n"
     "        if len(held) * len(x) >= len(ds):\n"
     "            for h in held:\n                feats[row : row + len(h)] = h\n                row += len(h)\n",
     ["tests/test_features.py", "-k", "budget"]),
    ("brain: banded out-of-fold predictions written to the wrong stimuli", "src/columnformer/brain/compare.py",
     "split[:, test] = np.asarray(pred)", "split[:, np.sort(test)] = np.asarray(pred)",
     ["tests/test_brain.py", "-k", "banded"]),
    ("brain: banded shares mapped to areas step-major", "src/columnformer/brain/compare.py",
     "top = shares.argmax(0)  # bands are ordered area-major, step-minor",
     "top = shares.argmax(0); top = (top % len(area_ids)) * T + top // len(area_ids)",
     ["tests/test_brain.py", "-k", "banded"]),
    ("layering: the preset table reaches up to config", "src/columnformer/presets.py",
     "from .errors import ConfigError\n", "from .errors import ConfigError\nfrom . import config as _config  # noqa: F401\n",
     ["tests/test_architecture.py"]),
    ("features: PCA projection without centring", "src/columnformer/brain/features.py",
     "x = (x - mean) @ comps", "x = x @ comps", ["tests/test_features.py", "-k", "reductions"]),
    ("penalties computed but not added to the loss", "src/columnformer/train.py",
     "                        reg = reg + penalty\n", "                        pass\n",
     ["tests/test_regularizers.py", "-k", "enter_the_loss"]),
    ("penalty schedule ignored", "src/columnformer/regularizers.py",
     "pc.weight * schedule_factor(step, total_steps, pc.start, pc.ramp) * v", "pc.weight * v",
     ["tests/test_regularizers.py", "-k", "enter_the_loss"]),
    ("response similarity of a column with itself", "src/columnformer/regularizers.py",
     "(z[pairs[:, 0]] * z[pairs[:, 1]])", "(z[pairs[:, 0]] * z[pairs[:, 0]])",
     ["tests/test_regularizers.py", "-k", "response_smoothness"]),
    ("lifetime sparseness from mis-scaled second moments", "src/columnformer/regularizers.py",
     "m1, m2 = self.m1 / n, self.m2 / n  # (T, U)", "m1, m2 = self.m1 / n, self.m2 / n**2  # (T, U)",
     ["tests/test_regularizers.py", "-k", "sparsity"]),
    ("weight smoothness compares a column with itself", "src/columnformer/regularizers.py",
     "cosine_similarity(flat, smooth, dim=1", "cosine_similarity(flat, flat, dim=1",
     ["tests/test_regularizers.py", "-k", "weight_smoothness"]),
    ("expand: softmax mass of copied keys not divided", "src/columnformer/expand.py",
     "value / g if linear else value - torch.log(g)", "value / g if linear else value",
     ["tests/test_expand.py", "-k", "preserve_keeps"]),
    ("expand: parents tiled instead of blocked", "src/columnformer/expand.py",
     "rows, cols = np.arange(H) * h // H, np.arange(W) * w // W", "rows, cols = np.arange(H) % h, np.arange(W) % w",
     ["tests/test_expand.py", "-k", "parent_columns"]),
    ("expand: sparse parent edges lose their bias", "src/columnformer/expand.py",
     "return torch.where(found, old_vals, value)", "return value", ["tests/test_expand.py", "-k", "sparse"]),
    ("learned positions: no repulsion in the loss", "src/columnformer/sheet.py",
     "return ponder if self.repulsion is None else ponder + self.repulsion_weight * self.repulsion", "return ponder",
     ["tests/test_learned_geometry.py", "-k", "collapse"]),
    ("learned positions: wiring normaliser of the initial geometry", "src/columnformer/sheet.py",
     "        w = dp / dp.mean()\n", "        w = dp / self.initial_geometry.mean_distance_power(self.cfg.wiring_p)\n",
     ["tests/test_learned_geometry.py", "-k", "ignore_scale"]),
    ("reconnect leaves the old local edges", "src/columnformer/connectivity.py",
     "                index[q, slot] = next(fresh)\n                changed[q, slot] = True\n",
     "                changed[q, slot] = True\n", ["tests/test_learned_geometry.py", "-k", "reconnect"]),
    ("orientation: vector sum over theta instead of 2 theta", "src/columnformer/analysis/orientation.py",
     "vec = (curves * np.exp(2j * thetas)[:, None]).sum(0)", "vec = (curves * np.exp(1j * thetas)[:, None]).sum(0)",
     ["tests/test_orientation_photos.py", "-k", "osi"]),
    ("pinwheels: winding without wrapping the angle steps", "src/columnformer/analysis/orientation.py",
     "wind = sum(np.angle(np.exp(1j * (loop[(k + 1) % 4] - loop[k]))) for k in range(4))",
     "wind = sum(loop[(k + 1) % 4] - loop[k] for k in range(4))", ["tests/test_orientation_photos.py", "-k", "pinwheels"]),
    ("photos: validation band overlaps the training band", "src/columnformer/data/photos.py",
     '"val": (train_end, val_end)', '"val": (train_end // 2, val_end)', ["tests/test_orientation_photos.py", "-k", "disjoint"]),
    ("patches joined across the layers of a stack", "src/columnformer/analysis/patches.py",
     "            pairs = pairs[geometry.layer[above[pairs[:, 0]]] == geometry.layer[above[pairs[:, 1]]]]\n",
     "            pass\n", ["tests/test_patches.py", "-k", "layer"]),
    ("Welch t with biased variances", "src/columnformer/analysis/patches.py",
     "var_c = np.maximum(ss - count * mu_c**2, 0.0) / (count - 1)", "var_c = np.maximum(ss - count * mu_c**2, 0.0) / count",
     ["tests/test_patches.py", "-k", "welch"]),
    ("smoothness null curve from the unshuffled distances", "src/columnformer/analysis/topography.py",
     'shuffled_curves.append(binned(ds, sim, edges)["mean"])', 'shuffled_curves.append(binned(d, sim, edges)["mean"])',
     ["tests/test_patches.py", "-k", "null_band"]),
    ("fixed-spread constraint skipped", "src/columnformer/sheet.py",
     "        self.positions.copy_(centre + (self.positions - centre) * (self.initial_spread / spread))\n",
     "        pass\n", ["tests/test_learned_geometry.py", "-k", "fixed_spread"]),
    ("grid resampling keeps the columns' list order", "src/columnformer/analysis/orientation.py",
     "out += unit * np.where(np.isnan(lin), near, lin)", "out += unit * part",
     ["tests/test_orientation_photos.py", "-k", "grid_resample"]),
    ("brain encoding reports the next step as the best", "src/columnformer/brain/compare.py",
     "    best_step = best % T\n", "    best_step = (best + 1) % T\n", ["tests/test_brain.py", "-k", "synthetic"]),
    ("tile bootstrap counts every pinwheel in the first tile", "src/columnformer/analysis/orientation.py",
     "        counts[ty[r], tx[c]] += 1\n", "        counts[0, 0] += 1\n", ["tests/test_orientation_photos.py", "-k", "tile_bootstrap"]),
    ("expand: spatial pool logits of copied outputs not lowered", "src/columnformer/expand.py",
     "        value -= torch.log(torch.from_numpy(counts).to(src.dtype))\n", "        pass\n",
     ["tests/test_expand.py", "-k", "preserve_keeps"]),
]


def apply(tree: Path, file: str, old: str, new: str) -> None:
    path = tree / file
    text = path.read_text()
    if text.count(old) < 1:
        raise SystemExit(f"mutation target not found in {file}: {old[:60]!r} (the code changed; update MUTATIONS)")
    path.write_text(text.replace(old, new, 1))


def run_tests(mutation: tuple[str, str, str] | None, tests: list[str]) -> int:
    """Run ``tests`` on a fresh copy of HEAD, with ``mutation`` (file, old, new) applied; the pytest exit code."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        shared = ROOT.parent / "shared"
        if shared.exists():
            os.symlink(shared, Path(tmp) / "shared")
        if mutation is not None:
            apply(tree, *mutation)
        env = {**os.environ, "PYTHONPATH": str(tree / "src"), "CI": ""}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=tree, env=env, capture_output=True, text=True)
    return proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--only", default="", help="run only the mutations whose name contains this text")
    args = ap.parse_args()
    selected = [m for m in MUTATIONS if args.only in m[0]]
    if args.list:
        for name, file, *_rest, tests in MUTATIONS:
            print(f"{name}: {file} -> {' '.join(tests)}")
        return 0
    # control: every selection passes on the unmutated copy (so a failure below is the mutation's doing)
    selections = {tuple(t) for *_rest, t in selected}
    for tests in sorted(selections):
        code = run_tests(None, list(tests))
        if code != 0:
            print(f"control failed: `{' '.join(tests)}` does not pass on the unmutated tree (exit {code})")
            return 2
    print(f"control: all {len(selections)} test selections pass on the unmutated tree\n")
    survived = 0
    print("| mutation | file | tests | result |\n|---|---|---|---|")
    for name, file, old, new, tests in selected:
        code = run_tests((file, old, new), tests)
        caught = code not in (0, 5)  # 5: no tests collected counts as not caught
        survived += not caught
        print(f"| {name} | `{file}` | `{' '.join(tests)}` | {'caught' if caught else '**SURVIVED**'} |", flush=True)
    print(f"\n{len(selected) - survived}/{len(selected)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
