"""Import models trained with the predecessor, clane9/columnformers (``src/columnformers``).

What "equivalent" means. The presets ``vit-tiny``, ``columnformer-ff-tiny`` and ``columnformer-rec-tiny``
compute the same function as the predecessor's ``vision_transformer_tiny_patch16_128``,
``vision_columnformer_ff_tiny_patch16_128`` and ``vision_columnformer_r_tiny_patch16_128``: given the
same weights, the same logits (to float32 round-off: 1e-5 relative) and the same attention maps (1e-6),
and the same wiring cost at the same lambda, because they use its geometry (``geometry.multilayer``:
linspace spacing, depth offset) and its head order (``model.head_norm: tokens``). Initialisation draws
from the same distributions (truncated normal, std 0.02; local bias ``clamp(-d^2/8, -8)`` on the same
distances), not the same random numbers. ``tests/test_predecessor.py`` checks all of this against
fixtures made by the predecessor's own code (``tests/fixtures/predecessor/``, see its README).

Weight layout. The predecessor keeps untied weights as (N, out, in) and the position embedding as
(1, N, C); this library as (N, in, out) and (N, C). ``convert_state_dict`` maps names and layouts:

    patch_embed.proj.*                    -> embed.proj.*
    encoder.pos_embed / time_embed        -> sheet.pos_embed / time_embed
    encoder.blocks.i.{norm1,norm2}.*      -> sheet.blocks.i.{norm1,norm2}.*
    encoder.blocks.i.attn.{q,k,v,proj}.*  -> sheet.blocks.i.attn.{q,k,v,proj}.*   (untied: transposed)
    encoder.blocks.i.attn.{bias,head_bias} -> sheet.blocks.i.attn.{bias,head_bias}  (linmixing: per-head weights)
    encoder.blocks.i.mlp.{fc1,fc2}.*      -> sheet.blocks.i.mlp.{fc1,fc2}.*        (untied: transposed;
                                             MixtureLinear (out, in, E) -> (E, in, out), bias (out, E) -> (E, out))
    encoder.blocks.i.coef.{weight,scale}  -> sheet.blocks.i.coef.{logits,scale}   (MixtureCoefficients: same formula)
    norm.* / pool.weight / head.*         -> head.norm.* / head.pool_weight / head.fc.*
    encoder.geometry                      -> checked against this model's connection lengths

The mixture presets ``tut-tiny`` and ``moemixer-tiny`` are the predecessor's ``vision_tut_tiny_patch16_128``
and ``vision_moemixer_tiny_patch16_128`` (static weight banks for the MLP, ``linmixing`` attention with
per-head weights, experts per block). Selection attention (a static query per column and head, against the
raw input rather than a key projection) and direct edges have no counterpart; their keys are refused by name.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, save_checkpoint

UPSTREAM = "https://github.com/clane9/columnformers"
STRIP_PREFIXES = ("module.", "_orig_mod.")

# (predecessor key pattern, our key template, untied weights transposed?)
_RULES: list[tuple[re.Pattern, str, bool]] = [
    (re.compile(r"patch_embed\.proj\.(weight|bias)"), r"embed.proj.\1", False),
    (re.compile(r"encoder\.(pos_embed|time_embed)"), r"sheet.\1", False),
    (re.compile(r"encoder\.blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)"), r"sheet.blocks.\1.\2.\3", False),
    (re.compile(r"encoder\.blocks\.(\d+)\.attn\.(q|k|v|proj)\.(weight|bias)"), r"sheet.blocks.\1.attn.\2.\3", True),
    (re.compile(r"encoder\.blocks\.(\d+)\.attn\.(bias|head_bias)"), r"sheet.blocks.\1.attn.\2", False),
    (re.compile(r"encoder\.blocks\.(\d+)\.coef\.weight"), r"sheet.blocks.\1.coef.logits", False),
    (re.compile(r"encoder\.blocks\.(\d+)\.coef\.scale"), r"sheet.blocks.\1.coef.scale", False),
    (re.compile(r"encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)"), r"sheet.blocks.\1.mlp.\2.\3", True),
    (re.compile(r"norm\.(weight|bias)"), r"head.norm.\1", False),
    (re.compile(r"pool\.weight"), r"head.pool_weight", False),
    (re.compile(r"head\.(weight|bias)"), r"head.fc.\1", False),
]
_COEF_ALIAS = re.compile(r"encoder\.blocks\.(\d+)\.(?:.+\.)coef\.(weight|scale)")
_UNSUPPORTED = {
    "query": "selection attention",
    "direct_edges": "direct edges",
}
GEOMETRY_KEY = "encoder.geometry"
GEOMETRY_ATOL = 1e-3  # the predecessor's float32 torch.cdist (matmul form) is off by up to ~1e-3


class PredecessorImportError(CheckpointError):
    """A predecessor checkpoint that does not fit the chosen model (names the key and the fix)."""


def read_predecessor_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The model state dict of a predecessor checkpoint file, and what else it records.

    Accepts its training checkpoints (a dict with ``model``, ``optimizer``, ``epoch``, ``loss``) and bare
    state dicts; strips ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes. Loads with
    ``weights_only=True`` (no unpickling of arbitrary objects).
    """
    path = Path(path)
    if not path.is_file():
        raise PredecessorImportError(f"predecessor checkpoint {str(path)!r} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or unsafe (pickled objects) files
        raise PredecessorImportError(
            f"{str(path)!r} is not a loadable PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); pass a checkpoint written by the predecessor's training script "
            "or a torch.save'd state dict"
        ) from None
    if not isinstance(raw, dict):
        raise PredecessorImportError(f"{str(path)!r} holds a {type(raw).__name__}, not a checkpoint dict or state dict")
    meta = {k: raw[k] for k in ("epoch", "loss") if k in raw and isinstance(raw[k], (int, float))}
    state = raw["model"] if isinstance(raw.get("model"), dict) else raw
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise PredecessorImportError(f"{str(path)!r}: entry {key!r} is not a tensor; is this a model state dict?")
        name = key
        while name.startswith(STRIP_PREFIXES):
            name = name[len(next(p for p in STRIP_PREFIXES if name.startswith(p))):]
        out[name] = value
    if not out:
        raise PredecessorImportError(f"{str(path)!r} holds no tensors")
    return out, meta


def convert_state_dict(pred: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map a predecessor state dict onto ``model`` (a :class:`~columnformer.vision.VisionColumnformer`).

    Every predecessor tensor must land on a tensor of the same shape and every tensor of ``model``
    must be covered; otherwise :class:`PredecessorImportError` names the first keys that do not fit.
    """
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unknown, shapes = [], []
    for key, value in pred.items():
        if key == GEOMETRY_KEY:
            _check_geometry(value, model)
            continue
        alias = _COEF_ALIAS.fullmatch(key)
        if alias is not None:  # a layer's reference to its block's shared coefficients: the same tensor again
            block_key = f"encoder.blocks.{alias.group(1)}.coef.{alias.group(2)}"
            if block_key not in pred or not torch.equal(pred[block_key], value):
                raise PredecessorImportError(
                    f"key {key!r} should repeat {block_key!r} (a block's layers share its mixture coefficients), "
                    "but that key is missing or differs; is the checkpoint edited?"
                )
            continue
        what = next((_UNSUPPORTED[part] for part in key.split(".") if part in _UNSUPPORTED), None)
        if what is not None:
            raise PredecessorImportError(
                f"key {key!r}: {what} have no counterpart in this library yet; dense untied / tied vision "
                "columnformers (the vit / ff / r tiny families), the mixture models (tut / moemixer) and other sizes of "
                "the same classes can be imported"
            )
        for pattern, template, untied_linear in _RULES:
            m = pattern.fullmatch(key)
            if m is None:
                continue
            ours = m.expand(template)
            if key == "encoder.pos_embed" and value.ndim == 3:
                value = value.squeeze(0)  # (1, N, C) -> (N, C)
            kind = _module_kind(model, ours)
            if kind == "mixture":  # expert weights (out, in, E) -> (E, in, out); biases / norm affines (d, E) -> (E, d)
                value = value.permute(2, 1, 0) if value.ndim == 3 else value.t()
            elif untied_linear and value.ndim == 3:
                value = value.transpose(1, 2)  # (N, out, in) -> (N, in, out)
            if ours not in own:
                unknown.append(f"{key} (-> {ours}, which this model does not have)")
            elif tuple(value.shape) != tuple(own[ours].shape):
                shapes.append(f"{key}: {tuple(value.shape)} -> {ours} {tuple(own[ours].shape)}")
            else:
                out[ours] = value.to(own[ours].dtype).contiguous()
            break
        else:
            unknown.append(f"{key} (no rule)")
    missing = [k for k in own if k not in out]
    if unknown or shapes or missing:
        parts = []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:4]))
        if unknown:
            parts.append("unexpected " + ", ".join(unknown[:4]))
        if missing:
            parts.append("missing in the checkpoint " + ", ".join(missing[:4]))
        raise PredecessorImportError(
            "the predecessor checkpoint does not fit the model built from this preset/config ("
            + "; ".join(parts) + "); pick the preset of the same family and set the sizes that differ with "
            "KEY=VALUE overrides (e.g. model.sheet.width=192 model.sheet.steps=4)"
        )
    return out


def _module_kind(model: torch.nn.Module, key: str) -> str:
    """'mixture' when ``key`` is a parameter of a weight-bank layer (MixtureLinear / MixtureLayerNorm), else 'plain'."""
    from .mixture import MixtureLayerNorm, MixtureLinear

    try:
        module = model.get_submodule(key.rsplit(".", 1)[0])
    except AttributeError:
        return "plain"
    return "mixture" if isinstance(module, (MixtureLinear, MixtureLayerNorm)) else "plain"


def _check_geometry(pred_dist: torch.Tensor, model: torch.nn.Module) -> None:
    ours = model.sheet.connectivity.dist
    if tuple(pred_dist.shape) != tuple(ours.shape):
        raise PredecessorImportError(
            f"key {GEOMETRY_KEY!r}: the checkpoint's geometry is {tuple(pred_dist.shape)}, this model's "
            f"{tuple(ours.shape)}; set model.geometry to the predecessor's layers"
        )
    err = float((pred_dist.float() - ours.float()).abs().max())
    if err > GEOMETRY_ATOL:
        raise PredecessorImportError(
            f"key {GEOMETRY_KEY!r}: the checkpoint's column distances differ from this model's by up to {err:.3g} "
            "(its wiring cost and bias initialisation would differ); use model.geometry.kind=multilayer with the "
            "predecessor's layers and depth offset (model.geometry.spacing)"
        )


def import_predecessor(
    checkpoint: str | Path,
    out: str | Path,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    overwrite: bool = False,
) -> Path:
    """Convert a predecessor checkpoint into a run directory ``out`` (config.yaml, checkpoints/last.pt,
    provenance.json) that ``eval``, ``analyze``, ``report`` and ``train init_from=`` accept.

    ``preset`` and ``overrides`` (dotted ``KEY=VALUE``, as for ``train``) give this library's config of the
    model; it must use the predecessor's head order (``model.head_norm=tokens``, set by the equivalent presets).
    """
    from .config import ConfigError, build_config
    from .run import provenance, remove_run, write_config, write_json
    from .tasks import build_task

    out = Path(out)
    raw = {"name": out.name, "out_dir": str(out.parent)}
    if preset is not None:
        raw["preset"] = preset
    cfg = build_config(raw, overrides)
    if cfg.task.name != "classify":
        raise ConfigError(f"task={cfg.task.name!r}: predecessor models are classifiers; use task=classify")
    if cfg.model.head_norm != "tokens":
        raise ConfigError(
            "model.head_norm=pooled: the predecessor normalises every output column before pooling; "
            "use a predecessor-equivalent preset or set model.head_norm=tokens"
        )
    pred, meta = read_predecessor_checkpoint(checkpoint)
    model = build_task(cfg.task, cfg.model).build_model()
    state = convert_state_dict(pred, model)
    model.load_state_dict(state)  # shapes and names were checked above
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{str(out)!r} exists; pass --overwrite to replace it or choose another --out")
        remove_run(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    source = {"imported_from": str(Path(checkpoint).resolve()), "sha256": digest, "upstream": UPSTREAM, **meta}
    write_config(cfg, out / "config.yaml")
    save_checkpoint({"model": model.state_dict(), "imported": source}, out / "checkpoints" / "last.pt")
    num_params = sum(p.numel() for p in model.parameters())
    write_json({**provenance(), "num_params": num_params, "predecessor": source}, out / "provenance.json")
    return out


def _cmd_import(args) -> int:
    import json

    # errors (a checkpoint that does not fit, an existing --out) are bad input: cli.main prints them, exit 2
    path = import_predecessor(args.checkpoint, args.out, args.preset, args.overrides, args.overwrite)
    print(json.dumps({"run": str(path), "checkpoint": str(path / "checkpoints" / "last.pt")}))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "import-predecessor",
        help="convert a clane9/columnformers checkpoint into a run directory",
        description="Convert a checkpoint (or state dict) of the predecessor's vision columnformer models into a run "
        "directory that eval / analyze / report / train init_from= accept. --preset picks the model family "
        "(vit-tiny, columnformer-ff-tiny, columnformer-rec-tiny, tut-tiny, moemixer-tiny); KEY=VALUE overrides set other sizes and the "
        "data to evaluate on.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="predecessor checkpoint file (.pt / .pth)")
    p.add_argument("--preset", required=True, help="predecessor-equivalent preset of the same family")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory to write, e.g. runs/imported-rec")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.sheet.width=192")
    p.set_defaults(func=_cmd_import)
