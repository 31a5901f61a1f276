"""Growing a trained sheet onto a larger geometry (``columnformer expand RUN --to SHAPE --out NEW``).

Every column of the new sheet takes the parameters of one trained column, its *parent*: on grid layouts
(grid, stacked, multilayer) the column of the same layer whose block of the old grid covers its position
(row ``r`` of an ``h``-row layer grown to ``H`` rows has parent row ``r * h // H``); on a sphere the nearest old
column. Per-column tensors (untied weights, layer norms, position embeddings, halting units, static queries)
are copied from the parent; tied tensors, the patch embedding and the head are copied as they are.

Edges. In mode ``preserve`` (dense sheets) the new per-edge bias is the parent pair's bias minus ``log g_j``,
``g_j`` the number of copies of the key's parent, so each query's softmax spreads over the copies exactly the
mass its parent gave the original key: the grown sheet computes the same function (logits equal up to
rounding) as long as the input area receives the same tokens (a stacked sheet's input becomes retinotopic:
each patch token feeds its parent's copies) and, under average pooling, every output column has the same number of
copies (spatial pooling's logits drop by log(copies) like the edge biases, so it needs no such condition). In mode ``nearest`` the parent pair's bias is copied as it is (dense) or, on a sparse sheet, the new
edges (rebuilt from the new geometry) take the bias of the parent edge where the parents were connected and
the distance initialisation (``bias_init``) where they were not; the function changes and ``noise`` (relative
to each tensor's standard deviation) breaks the symmetry between copies, which otherwise would stay identical
under training (same weights, same inputs, same gradients). Pass ``noise`` in ``preserve`` mode too to train on.

The result is a run directory (config.yaml with the new geometry, checkpoints/last.pt, provenance.json) that
``eval``, ``analyze``, ``report`` and ``train init_from=`` accept; continuing to train it is
``columnformer train --config NEW/config.yaml init_from=NEW name=...``. The schedule train -> prune/regrow edges
(``train.rewire``) -> grow -> train is documented in the README.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

MODES = ("preserve", "nearest")
_EDGE_KEYS = re.compile(r"(^|\.)attn\.(bias|head_bias)$")


def parse_shape(text: str, kind: str, layers: int) -> dict:
    """``--to`` for a geometry of ``kind``: ``HxW`` (every layer) or ``HxW,HxW,...`` (per layer); a sphere takes ``N``."""
    text = text.strip()
    if kind == "sphere":
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"--to {text!r}: a sphere grows to a number of columns, e.g. --to 256")
        return {"n": int(text)}
    parts = text.split(",")
    shapes = []
    for p in parts:
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", p)
        if not m or min(int(m.group(1)), int(m.group(2))) < 1:
            raise ValueError(f"--to {text!r}: give a grid shape HxW (e.g. 8x8) or one per layer (8x8,8x8,4x4)")
        shapes.append((int(m.group(1)), int(m.group(2))))
    if kind == "grid":
        if len(shapes) != 1:
            raise ValueError(f"--to {text!r}: a grid sheet has one layer; give one shape HxW")
        return {"shape": shapes[0]}
    if len(shapes) == 1:
        shapes = shapes * layers
    if len(shapes) != layers:
        raise ValueError(f"--to {text!r}: the sheet has {layers} layers; give one shape or {layers} shapes")
    return {"layers": shapes}


def parent_columns(old, new) -> np.ndarray:
    """For every column of geometry ``new``, the index of its parent column in geometry ``old`` (N_new,)."""
    if old.layer_shapes is not None and new.layer_shapes is not None:
        if len(old.layer_shapes) != len(new.layer_shapes):
            raise ValueError(
                f"the new geometry has {len(new.layer_shapes)} layers, the trained one {len(old.layer_shapes)}: "
                "expand grows each layer, it does not add layers"
            )
        parent = np.empty(new.n, dtype=np.int64)
        for layer, ((h, w), (H, W)) in enumerate(zip(old.layer_shapes, new.layer_shapes)):
            if H < h or W < w:
                raise ValueError(f"layer {layer} would shrink from {h}x{w} to {H}x{W}; expand only grows sheets")
            old_idx, new_idx = old.layer_indices(layer), new.layer_indices(layer)  # row-major inside a layer
            rows, cols = np.arange(H) * h // H, np.arange(W) * w // W
            parent[new_idx] = old_idx[(rows[:, None] * w + cols[None, :]).reshape(-1)]
        return parent
    if old.layer_shapes is None and new.layer_shapes is None and old.coords.shape[1] == new.coords.shape[1]:
        unit = lambda c: c / np.linalg.norm(c, axis=1, keepdims=True).clip(1e-12)  # noqa: E731  (sphere: directions)
        if new.n < old.n:
            raise ValueError(f"the new sphere has {new.n} columns, fewer than the trained {old.n}; expand only grows")
        return cKDTree(unit(old.coords)).query(unit(new.coords))[1].astype(np.int64)
    raise ValueError(f"cannot grow {old.name} into {new.name}: keep the geometry kind (grid, stacked, multilayer, sphere)")


def expanded_config(cfg, to: str):
    """The run config with the geometry grown to ``to`` (and a stacked sheet's input made retinotopic)."""
    from .config import RunConfig

    raw = cfg.model_dump(mode="json")
    g = raw["model"]["geometry"]
    new = parse_shape(to, g["kind"], len(g["layers"]))
    if g["kind"] == "sphere":
        pairs = [((g["n"],), (new["n"],))]
    else:
        pairs = list(zip([g["shape"]] if g["kind"] == "grid" else g["layers"], [new.get("shape")] if g["kind"] == "grid" else new["layers"]))
    for old_shape, new_shape in pairs:
        if any(b < a for a, b in zip(old_shape, new_shape)):
            raise ValueError(
                f"--to {to!r} would shrink the sheet ({'x'.join(map(str, old_shape))} -> {'x'.join(map(str, new_shape))}); "
                "expand only grows: give every layer at least its trained size"
            )
    g.update(new)
    if raw["model"]["input_area"] in ("bottom", "all") and g["kind"] != "sphere":
        raw["model"]["input_area"] = "retinotopic"  # patch tokens spread over the grown input layer
    return RunConfig.model_validate(raw)


def expand_state(old_model, new_model, mode: str = "preserve", noise: float = 0.0, seed: int = 0) -> dict:
    """The state dict of ``new_model`` grown from ``old_model`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    old_sheet, new_sheet = old_model.sheet, new_model.sheet
    if old_sheet.cfg.mixture != "none":
        raise ValueError("expand does not grow weight banks (model.sheet.mixture); train the larger sheet directly")
    parent = parent_columns(old_sheet.geometry, new_sheet.geometry)
    n_old, n_new = old_sheet.n, new_sheet.n
    copies = np.bincount(parent, minlength=n_old)
    p = torch.from_numpy(parent)
    dense = old_sheet.edge_index is None
    if mode == "preserve":
        _check_preserving(old_model, new_model, parent, copies, dense)
    old_state, new_state = old_model.state_dict(), new_model.state_dict()
    out = {}
    gen = torch.Generator().manual_seed(seed)
    for key, target in new_state.items():
        if key not in old_state:
            raise ValueError(f"{key}: in the grown model but not in the trained one (the configs differ beyond the geometry)")
        src = old_state[key]
        if key.startswith("sheet.") and _EDGE_KEYS.search(key[len("sheet."):]):
            value = _edge_tensor(src, key, old_sheet, new_sheet, parent, copies, mode, dense)
        elif key in ("sheet.edge_index", "sheet.edge_mask"):
            value = target  # the grown sheet's own connectivity
        elif key == "head.pool_weight":  # spatial pooling: (K, n_out) logits over the output columns
            value = _pool_logits(src, old_sheet, new_sheet, parent, mode)
        elif src.ndim and src.shape[0] == n_old and target.shape == (n_new, *src.shape[1:]):
            value = src[p].clone()  # per-column: the parent's row (tied tensors keep their shape: not per-column)
        elif src.shape == target.shape:
            value = src.clone()
        else:
            raise ValueError(f"{key}: trained shape {tuple(src.shape)} does not map onto the grown {tuple(target.shape)}")
        if noise and value.is_floating_point() and value.numel() > 1:
            value = value + noise * value.std() * torch.randn(value.shape, generator=gen, dtype=value.dtype)
        out[key] = value
    missing = set(old_state) - set(new_state) - {"sheet.edge_index", "sheet.edge_mask"}
    if missing:
        raise ValueError(f"{sorted(missing)[0]}: in the trained model but not in the grown one")
    return out


def _check_preserving(old_model, new_model, parent, copies, dense) -> None:
    old_sheet, new_sheet = old_model.sheet, new_model.sheet
    if not dense:
        raise ValueError(
            "mode=preserve needs a dense sheet (every copy of a key must stay reachable); use --mode nearest for "
            "sparse connectivity"
        )
    outs = parent[new_sheet.output_idx.numpy()]
    pool = getattr(getattr(new_model, "head", None), "pool", "avg")
    if pool == "avg" and len(set(copies[np.unique(outs)].tolist())) != 1:
        raise ValueError(
            "mode=preserve needs every output column copied the same number of times under average pooling: grow "
            "every layer by the same integer factor (e.g. 4x4 -> 8x8), or use --mode nearest"
        )
    old_tok = torch.full((old_sheet.n,), -1, dtype=torch.long)
    old_tok[old_sheet.input_idx] = old_sheet.input_token
    new_tok = torch.full((new_sheet.n,), -1, dtype=torch.long)
    new_tok[new_sheet.input_idx] = new_sheet.input_token
    if not torch.equal(new_tok, old_tok[torch.from_numpy(parent)]):
        raise ValueError(
            "mode=preserve needs every grown input column to receive its parent's patch token; grow the input layer "
            "by an integer factor, or use --mode nearest"
        )


def _pool_logits(src, old_sheet, new_sheet, parent, mode) -> torch.Tensor:
    """The spatial pool's logits (K, n_out) for the grown output area: each output column takes its parent's logit,
    minus log(copies of that parent among the outputs) in ``preserve`` mode (the softmax splits the parent's weight)."""
    where = {c: i for i, c in enumerate(old_sheet.output_idx.tolist())}
    parents = parent[new_sheet.output_idx.numpy()]
    if not all(int(c) in where for c in parents):
        raise ValueError("head.pool_weight: a grown output column's parent is not an output column of the trained sheet")
    cols = torch.tensor([where[int(c)] for c in parents])
    value = src[:, cols].clone()
    if mode == "preserve":
        counts = np.bincount(parents, minlength=old_sheet.n)[parents]
        value -= torch.log(torch.from_numpy(counts).to(src.dtype))
    return value


def _edge_tensor(src, key, old_sheet, new_sheet, parent, copies, mode, dense) -> torch.Tensor:
    """Per-edge bias (N, N|K) or per-head edge weights (H, N, N|K) of the grown sheet."""
    lead = src.shape[:-2]  # () or (H,)
    p = torch.from_numpy(parent)
    linear = old_sheet.cfg.attn_mode == "linmixing"
    if dense:
        value = src[..., p[:, None], p[None, :]].clone()  # (..., N_new, N_new): the parent pair's edge
        if mode == "preserve":
            g = torch.from_numpy(copies[parent]).to(src.dtype)  # copies of each key's parent
            value = value / g if linear else value - torch.log(g)
        return value
    # sparse: the new edges come from the new geometry; parent edges keep their bias, others start by distance
    new_idx, old_idx = new_sheet.edge_index, old_sheet.edge_index  # (N_new, K'), (N_old, K)
    init = new_sheet.bias_init(new_sheet.connectivity.dist).to(src.dtype)  # (N_new, K')
    value = init.expand(*lead, *init.shape).clone()
    qp, kp = p[:, None].expand_as(new_idx), p[new_idx]  # parents of each new edge's query and key
    match = (old_idx[qp] == kp.unsqueeze(-1)) & old_sheet.edge_mask[qp]  # (N_new, K', K): the parents' old edge
    found = match.any(-1)
    slot = match.float().argmax(-1)  # (N_new, K'): which of the parent query's edges
    old_vals = src[..., qp, slot]  # (..., N_new, K')
    return torch.where(found, old_vals, value)


def expand_run(
    run_dir: str | Path, to: str, out: str | Path, mode: str = "preserve", noise: float | None = None,
    checkpoint: str = "last", overwrite: bool = False, seed: int = 0,
) -> dict:
    """Grow the trained sheet of ``run_dir`` to ``to`` and write the run directory ``out``; returns a summary."""
    from .checkpoint import save_checkpoint
    from .run import load_run, provenance, remove_run, write_config, write_json
    from .tasks import build_task

    run = load_run(run_dir, checkpoint)
    out = Path(out)
    cfg = expanded_config(run.config, to).model_copy(update={"name": out.name, "out_dir": str(out.parent)})
    new_model = build_task(cfg.task, cfg.model).build_model()
    if noise is None:
        noise = 0.0 if mode == "preserve" else 0.01
    state = expand_state(run.model, new_model, mode, noise, seed)
    new_model.load_state_dict(state)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{str(out)!r} exists; pass --overwrite to replace it or choose another --out")
        remove_run(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    source = {"expanded_from": str(Path(run_dir).resolve()), "checkpoint": run.checkpoint, "to": to, "mode": mode,
              "noise": noise, "seed": seed, "columns": [run.model.sheet.n, new_model.sheet.n]}
    write_config(cfg, out / "config.yaml")
    save_checkpoint({"model": new_model.state_dict(), "expanded": source}, out / "checkpoints" / "last.pt")
    write_json({**provenance(), "num_params": sum(p.numel() for p in new_model.parameters()), "expanded": source},
               out / "provenance.json")
    return {"run": str(out), **source}


def _cmd_expand(args) -> int:
    # bad input (an unknown run, a shape that shrinks, an existing --out) is a ValueError / ConfigError:
    # cli.main prints the message and exits 2
    print(json.dumps(expand_run(args.run, args.to, args.out, args.mode, args.noise, args.checkpoint, args.overwrite,
                                args.seed)))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "expand", help="grow a trained sheet onto a larger geometry (new columns copied from their parents)",
        description="Grow RUN's sheet to --to (grid/stacked: HxW for every layer or one per layer; sphere: N) and "
        "write a run directory --out. --mode preserve (dense sheets) keeps the function: logits equal; --mode "
        "nearest copies parents and rebuilds sparse edges by distance. Continue training with "
        "`columnformer train --config OUT/config.yaml init_from=OUT name=...`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="trained run directory")
    p.add_argument("--to", required=True, help="new shape: 8x8 (every layer), 8x8,8x8,4x4 (per layer), or N (sphere)")
    p.add_argument("--out", required=True, metavar="NEW_RUN", help="run directory to write")
    p.add_argument("--mode", choices=MODES, default="preserve")
    p.add_argument("--noise", type=float, default=None,
                   help="relative noise added to the copied tensors (default 0 for preserve, 0.01 for nearest)")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_expand)
