"""Hook points of Hugging Face causal LMs: names, resolution, capture and splice.

A *hook point* is a string naming one activation of the language model (B = batch,
T = sequence length):

    embed                   residual stream entering block 0 (see below)        [B, T, d_model]
    layers.{i}.resid_pre    hidden states entering block i                      [B, T, d_model]
    layers.{i}.attn_z       input of block i's attention output projection      [B, T, n_heads*d_head]
                            (per-head outputs concatenated, head-major)
    layers.{i}.attn_out     what block i's attention adds to the residual       [B, T, d_model]
    layers.{i}.mlp_out      what block i's MLP adds to the residual             [B, T, d_model]
    layers.{i}.resid_post   hidden states leaving block i                       [B, T, d_model]

Definitions, in the units of the model's own hidden states:

- ``embed`` is the residual stream entering block 0, i.e. the *same value* as
  ``layers.0.resid_pre``. It therefore includes whatever the model does between its token
  embedding and its first block: GPT-2's learned position embeddings, Gemma's sqrt(d_model)
  embedding scale (a separate multiply in some transformers versions, inside the
  embedding module in others), embedding dropout (identity in eval mode).
- ``attn_out`` / ``mlp_out`` are the terms added to the residual stream. For pre-norm
  blocks (Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, Gemma, Phi) this is the attention module's
  output (after its output projection) and the MLP module's output. For "sandwich" blocks
  whose sublayer outputs are normalized before the residual add (Gemma2, Gemma3, OLMo2:
  they have a ``post_feedforward_layernorm``), it is the output of the post-attention norm
  and of the post-feedforward norm, i.e. again exactly what is added to the residual.
  Dropout applied between the sublayer and the residual add (GPT-NeoX, Phi) is identity
  in eval mode and is not part of these values.
  Hence, in eval mode, for all supported families (parallel-residual GPT-NeoX/Phi too):
  ``resid_post_i == resid_pre_i + attn_out_i + mlp_out_i`` (up to float rounding).
- ``attn_z`` is the input of the attention output projection (``o_proj`` / ``c_proj`` /
  ``dense``): ``attn_out == out_proj(attn_z)`` (then the post-attention norm for sandwich
  blocks). Head ``h`` occupies columns ``h*d_head:(h+1)*d_head``.

Relation to ``model(..., output_hidden_states=True).hidden_states`` (length n_layers + 1):
``hidden_states[i] == layers.{i}.resid_pre`` for every i, ``hidden_states[i + 1] ==
layers.{i}.resid_post`` except for the last block: ``hidden_states[-1]`` is taken *after* the
final norm, i.e. ``final_norm(layers.{n-1}.resid_post)``.

Resolution inspects the module tree (no per-model table): the blocks are the
``nn.ModuleList`` whose elements own an attention child; inside a block the attention and
MLP are found by a small set of attribute names (``self_attn``/``attn``/``attention``,
``mlp``/``feed_forward``) or by class name (``*Attention*``, ``*MLP*``), and the output
projection inside the attention by name (``o_proj``/``c_proj``/``dense``/``out_proj``) or as
its last linear layer mapping to ``d_model``.

Values entering a module are read from the positional argument or the keyword argument
(decoder layers may get ``hidden_states`` either way); values leaving a module are taken from
a tensor output or element 0 of a tuple output (transformers 4 returned tuples from decoder
layers, transformers 5 returns tensors).

Typical use::

    acts = run_with_capture(model, input_ids, ["layers.6.resid_post"])    # stops after block 6
    with splice(model, {"layers.6.resid_post": sae_reconstruct}):
        logits = model(input_ids).logits                                   # downstream loss
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "HOOK_KINDS",
    "ModelParts",
    "HookSite",
    "model_parts",
    "list_hook_points",
    "parse_hook_point",
    "format_hook_point",
    "hook_point_sort_key",
    "hook_point_dim",
    "resolve_hook_point",
    "register_hook",
    "capture",
    "run_with_capture",
    "splice",
]

#: Per-layer hook kinds (plus the model-level ``"embed"``).
HOOK_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn_z")

# The order in which the kinds fire inside one block (forward order).
_KIND_ORDER = {"resid_pre": 0, "attn_z": 1, "attn_out": 2, "mlp_out": 3, "resid_post": 4}

_VALID_FORMS = (
    "valid forms: 'embed', 'layers.{i}.resid_pre', 'layers.{i}.resid_post', "
    "'layers.{i}.attn_out', 'layers.{i}.mlp_out', 'layers.{i}.attn_z' (i = 0-based block index)"
)
_NAME_RE = re.compile(r"^layers\.(0|[1-9]\d*)\.(" + "|".join(HOOK_KINDS) + r")$")
# TransformerLens / SAELens names, only to suggest the right spelling in error messages.
_TL_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|attn\.hook_z)$")
_TL_KIND = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "attn.hook_z": "attn_z",
}

# Known attribute names, tried before class-name matching.
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_OUT_PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo", "o_dense")
_POST_MLP_NORM_NAMES = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_ffw_norm")
_POST_ATTN_NORM_NAMES = ("post_attention_layernorm", "post_attn_layernorm", "post_attention_norm")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")


# --------------------------------------------------------------------------- names


def parse_hook_point(name: str) -> tuple[int | None, str]:
    """Split a hook-point string into ``(layer, kind)``.

    ``"layers.6.mlp_out"`` -> ``(6, "mlp_out")``; ``"embed"`` -> ``(None, "embed")``.
    Only the syntax is checked here (not whether the layer exists in some model: see
    :func:`resolve_hook_point`). Raises ``ValueError`` listing the valid forms on bad syntax.
    """
    if not isinstance(name, str):
        raise ValueError(f"a hook point is a string, got {type(name).__name__} {name!r}; {_VALID_FORMS}")
    if name == "embed":
        return None, "embed"
    m = _NAME_RE.match(name)
    if m is not None:
        return int(m.group(1)), m.group(2)
    hint = ""
    tl = _TL_RE.match(name)
    if tl is not None:
        hint = f" (did you mean 'layers.{tl.group(1)}.{_TL_KIND[tl.group(2)]}'? TransformerLens names are not accepted)"
    elif name in ("hook_embed", "embed_tokens", "embeddings"):
        hint = " (did you mean 'embed'?)"
    raise ValueError(f"invalid hook point {name!r}{hint}; {_VALID_FORMS}")


def format_hook_point(layer: int | None, kind: str) -> str:
    """Inverse of :func:`parse_hook_point`: ``(6, "mlp_out")`` -> ``"layers.6.mlp_out"``."""
    if kind == "embed" and layer is None:
        return "embed"
    if kind not in HOOK_KINDS or layer is None or int(layer) < 0:
        raise ValueError(f"cannot format hook point from layer={layer!r}, kind={kind!r}; {_VALID_FORMS}")
    return f"layers.{int(layer)}.{kind}"


def hook_point_sort_key(name: str) -> tuple[int, int]:
    """Sort key giving the order in which hook points fire during a forward.

    ``embed`` first, then per block ``resid_pre < attn_z < attn_out < mlp_out < resid_post``.
    (``embed`` and ``layers.0.resid_pre`` hold the same value; ``embed`` sorts first.)
    """
    layer, kind = parse_hook_point(name)
    if layer is None:
        return (-1, 0)
    return (layer, _KIND_ORDER[kind])


# --------------------------------------------------------------------------- model parts


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get = getattr(cfg, "get_text_config", None)
    if callable(get):
        try:
            return get()
        except Exception:  # pragma: no cover - odd configs
            return cfg
    return cfg


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    path = str(getattr(cfg, "_name_or_path", "") or "").rstrip("/")
    base = os.path.basename(path) if path else ""
    cls = type(model).__name__
    return f"{base} ({cls})" if base else cls


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _is_linear_like(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, Tensor) and w.dim() == 2 and not isinstance(module, nn.Embedding)


def _in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 style Conv1D (weight [in, out])."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "nx") and hasattr(module, "nf"):  # transformers' Conv1D
        return int(module.nx), int(module.nf)
    w = module.weight
    return int(w.shape[1]), int(w.shape[0])


def _child(module: nn.Module, names: Sequence[str]) -> tuple[str, nn.Module] | None:
    children = module._modules  # not named_children(): that hides aliases of one module
    for n in names:
        if n in children and children[n] is not None:
            return n, children[n]
    return None


def _find_attention(block: nn.Module) -> tuple[str, nn.Module] | None:
    hit = _child(block, _ATTN_NAMES)
    if hit is not None:
        return hit
    for n, c in block.named_children():
        cls = type(c).__name__.lower()
        if "attention" in cls and "cross" not in cls and "cross" not in n.lower():
            return n, c
    return None


def _find_mlp(block: nn.Module) -> tuple[str, nn.Module] | None:
    hit = _child(block, _MLP_NAMES)
    if hit is not None:
        return hit
    for n, c in block.named_children():
        cls = type(c).__name__.lower()
        if any(s in cls for s in ("mlp", "feedforward", "ffn", "moe")):
            return n, c
    return None


def _find_blocks(model: nn.Module, n_layers_hint: int | None) -> tuple[str, nn.ModuleList]:
    candidates = []
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if _find_attention(mod[0]) is None:
            continue
        n_params = sum(p.numel() for p in mod.parameters())
        matches = n_layers_hint is not None and len(mod) == n_layers_hint
        candidates.append((matches, n_params, -path.count("."), path, mod))
    if not candidates:
        raise ValueError(
            f"could not find the transformer blocks of {_model_name(model)}: no nn.ModuleList whose "
            "elements have an attention child (attribute self_attn/attn/attention or a class named "
            "*Attention*). hf_sae.hooks supports decoder-only HF causal LMs (Llama, Mistral, Qwen2, "
            "GPT-2, GPT-NeoX, Gemma, ...)."
        )
    best = max(candidates, key=lambda c: c[:3])
    return best[3], best[4]


@dataclass(frozen=True)
class ModelParts:
    """The pieces of a HF causal LM found by inspecting its module tree.

    Attributes:
        embed: token-embedding module (``model.get_input_embeddings()``). Note the ``embed``
            hook point is the residual stream entering block 0, not necessarily this module's
            output (GPT-2 adds position embeddings, older Gemma code scales afterwards).
        blocks: the transformer blocks, in forward order.
        final_norm: the norm applied after the last block (``None`` if none was found).
        lm_head: the unembedding (``model.get_output_embeddings()``), ``None`` for base models.
        n_layers: number of blocks.
        d_model: width of the residual stream.
        n_heads: number of attention (query) heads.
        d_head: width of one head; ``attn_z`` has ``n_heads * d_head`` features.
        name: short model name used in error messages.
        blocks_path: dotted path of ``blocks`` inside the model (e.g. ``"model.layers"``).
    """

    embed: nn.Module
    blocks: nn.ModuleList
    final_norm: nn.Module | None
    lm_head: nn.Module | None
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    name: str = "model"
    blocks_path: str = ""

    def _block(self, i: int) -> nn.Module:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n_layers:
            raise ValueError(f"layers.{i} does not exist: {self.name} has layers 0..{self.n_layers - 1}")
        return self.blocks[i]

    def _attn_named(self, i: int) -> tuple[str, nn.Module]:
        hit = _find_attention(self._block(i))
        if hit is None:
            raise ValueError(f"block {i} of {self.name} has no attention child (self_attn/attn/attention)")
        return hit

    def _mlp_named(self, i: int) -> tuple[str, nn.Module]:
        hit = _find_mlp(self._block(i))
        if hit is None:
            raise ValueError(f"block {i} of {self.name} has no MLP child (mlp/feed_forward or class *MLP*)")
        return hit

    def attn(self, i: int) -> nn.Module:
        """Block ``i``'s attention module."""
        return self._attn_named(i)[1]

    def mlp(self, i: int) -> nn.Module:
        """Block ``i``'s MLP (feed-forward) module."""
        return self._mlp_named(i)[1]

    def attn_out_proj(self, i: int) -> nn.Module:
        """Block ``i``'s attention output projection [n_heads*d_head -> d_model] (o_proj / c_proj / dense)."""
        attn = self.attn(i)
        hit = _child(attn, _OUT_PROJ_NAMES)
        if hit is not None and _is_linear_like(hit[1]):
            return hit[1]
        last = None
        for _, c in attn.named_children():
            if _is_linear_like(c) and _in_out_features(c)[1] == self.d_model:
                last = c
        if last is None:
            raise ValueError(
                f"could not find the attention output projection of block {i} of {self.name}: no child "
                f"named {'/'.join(_OUT_PROJ_NAMES)} and no linear child mapping to d_model={self.d_model}"
            )
        return last

    def post_attn_norm(self, i: int) -> nn.Module | None:
        """The norm applied to the attention output before the residual add (Gemma2/3, OLMo2), else None.

        Detected as a block with a post-feedforward norm (``post_feedforward_layernorm``): only
        then is ``post_attention_layernorm`` a post-norm (in Llama/GPT-NeoX that name is the
        norm *before* the MLP).
        """
        block = self._block(i)
        if _child(block, _POST_MLP_NORM_NAMES) is None:
            return None
        hit = _child(block, _POST_ATTN_NORM_NAMES)
        return hit[1] if hit is not None else None

    def post_mlp_norm(self, i: int) -> nn.Module | None:
        """The norm applied to the MLP output before the residual add (Gemma2/3, OLMo2), else None."""
        hit = _child(self._block(i), _POST_MLP_NORM_NAMES)
        return hit[1] if hit is not None else None


def model_parts(model: nn.Module) -> ModelParts:
    """Find embedding, blocks, final norm, LM head and sizes of a HF causal LM by inspection.

    Raises ``ValueError`` if no block list can be found (encoder-only or exotic models).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch nn.Module (a HF causal LM), got {type(model).__name__}")
    cfg = _text_config(model)
    n_hint = getattr(cfg, "num_hidden_layers", None) if cfg is not None else None
    blocks_path, blocks = _find_blocks(model, n_hint if isinstance(n_hint, int) else None)

    embed = None
    get_in = getattr(model, "get_input_embeddings", None)
    if callable(get_in):
        try:
            embed = get_in()
        except Exception:
            embed = None
    if embed is None:
        embed = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embed is None:
        raise ValueError(f"could not find the token embedding of {_model_name(model)}")

    lm_head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            lm_head = get_out()
        except Exception:
            lm_head = None

    # The final norm: a norm child of the module owning the blocks.
    parent = model.get_submodule(blocks_path.rsplit(".", 1)[0]) if "." in blocks_path else model
    norms = [(n, c) for n, c in parent.named_children() if _is_norm(c)]
    final_norm = None
    for n, c in norms:
        if n in _FINAL_NORM_NAMES:
            final_norm = c
    if final_norm is None and norms:
        final_norm = norms[-1][1]

    d_model = getattr(embed, "embedding_dim", None) or getattr(cfg, "hidden_size", None)
    if d_model is None:
        d_model = int(embed.weight.shape[-1])
    n_heads = getattr(cfg, "num_attention_heads", None) if cfg is not None else None
    attn = _find_attention(blocks[0])[1]
    if n_heads is None:
        for a in ("num_heads", "num_attention_heads", "n_head", "n_heads"):
            n_heads = getattr(attn, a, None) or getattr(getattr(attn, "config", None), a, None)
            if n_heads:
                break
    if not n_heads:
        raise ValueError(f"could not determine the number of attention heads of {_model_name(model)}")
    parts = ModelParts(
        embed=embed,
        blocks=blocks,
        final_norm=final_norm,
        lm_head=lm_head,
        n_layers=len(blocks),
        d_model=int(d_model),
        n_heads=int(n_heads),
        d_head=1,
        name=_model_name(model),
        blocks_path=blocks_path,
    )
    try:
        d_z = _in_out_features(parts.attn_out_proj(0))[0]
        d_head = d_z // int(n_heads)
    except ValueError:
        d_head = getattr(cfg, "head_dim", None) or getattr(attn, "head_dim", None) or int(d_model) // int(n_heads)
    return dataclasses.replace(parts, d_head=int(d_head))


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class HookSite:
    """Where a hook point lives: a module and whether its value is that module's input or output.

    Attributes:
        name: canonical hook-point string.
        layer: block index (``None`` for ``embed``).
        kind: ``"embed"`` or one of :data:`HOOK_KINDS`.
        module: the module to hook.
        module_path: its dotted name in the model (for messages).
        io: ``"input"`` (value = argument ``arg_index`` or keyword ``kwarg_name`` of the call) or
            ``"output"`` (value = the output, or its element ``output_index`` if it is a tuple/list).
        arg_index: positional index of the value, for ``io == "input"``.
        kwarg_name: keyword the value may be passed under, for ``io == "input"``.
        output_index: element of a tuple/list output, for ``io == "output"``.
        dim: feature size of the value (last dimension): d_model, or n_heads*d_head for attn_z.
    """

    name: str
    layer: int | None
    kind: str
    module: nn.Module
    module_path: str
    io: str
    arg_index: int = 0
    kwarg_name: str | None = None
    output_index: int = 0
    dim: int = 0


def _first_param_name(module: nn.Module) -> str | None:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for p in params:
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            return p.name
        if p.kind == p.POSITIONAL_ONLY:
            return None
    return None


def _path_below(prefix: str, parent: nn.Module, module: nn.Module) -> str:
    """Dotted path of ``module`` given the path of an ancestor ``parent`` (for messages)."""
    for n, m in parent.named_modules():
        if m is module:
            return f"{prefix}.{n}".strip(".") if n else prefix
    return f"{prefix}.?"


def _resolve(model: nn.Module, parts: ModelParts, name: str) -> HookSite:
    layer, kind = parse_hook_point(name)
    if kind == "embed":
        layer_i = 0
    else:
        layer_i = layer
        if layer >= parts.n_layers:
            raise ValueError(
                f"{name!r}: layers.{layer} does not exist: {parts.name} has layers 0..{parts.n_layers - 1} "
                f"({_VALID_FORMS})"
            )
    block = parts.blocks[layer_i]
    if kind in ("embed", "resid_pre"):
        module, io = block, "input"
    elif kind == "resid_post":
        module, io = block, "output"
    elif kind == "attn_out":
        module, io = parts.post_attn_norm(layer_i) or parts.attn(layer_i), "output"
    elif kind == "mlp_out":
        module, io = parts.post_mlp_norm(layer_i) or parts.mlp(layer_i), "output"
    elif kind == "attn_z":
        module, io = parts.attn_out_proj(layer_i), "input"
    else:  # pragma: no cover - parse_hook_point guards this
        raise ValueError(f"invalid hook point {name!r}; {_VALID_FORMS}")
    dim = _in_out_features(module)[0] if kind == "attn_z" else parts.d_model
    block_path = f"{parts.blocks_path}.{layer_i}".strip(".")
    return HookSite(
        name=name,
        layer=layer,
        kind=kind,
        module=module,
        module_path=_path_below(block_path, block, module),
        io=io,
        arg_index=0,
        kwarg_name=_first_param_name(module) if io == "input" else None,
        output_index=0,
        dim=int(dim),
    )


def resolve_hook_point(model: nn.Module, name: str) -> HookSite:
    """Resolve a hook-point string to the :class:`HookSite` (module + input/output) in ``model``.

    Raises ``ValueError`` on bad syntax (listing the valid forms) and on a layer out of range
    (naming the model's valid range, e.g. ``"layers.40 does not exist: ... has layers 0..29"``).
    """
    return _resolve(model, model_parts(model), name)


def list_hook_points(model: nn.Module) -> list[str]:
    """Every valid hook point of ``model``, in forward order.

    ``["embed", "layers.0.resid_pre", "layers.0.attn_z", "layers.0.attn_out", "layers.0.mlp_out",
    "layers.0.resid_post", "layers.1.resid_pre", ...]`` (kinds a block lacks are left out).
    """
    parts = model_parts(model)
    names = ["embed"]
    for i in range(parts.n_layers):
        for kind in sorted(HOOK_KINDS, key=_KIND_ORDER.__getitem__):
            try:
                _resolve(model, parts, f"layers.{i}.{kind}")
            except ValueError:
                continue
            names.append(f"layers.{i}.{kind}")
    return names


def hook_point_dim(model: nn.Module, name: str) -> int:
    """Feature size (last dim) of the activation at ``name``: d_model, or n_heads*d_head for attn_z."""
    return resolve_hook_point(model, name).dim


def _resolve_many(model: nn.Module, hook_points) -> list[HookSite]:
    if isinstance(hook_points, str):
        hook_points = [hook_points]
    hook_points = list(dict.fromkeys(hook_points))
    if not hook_points:
        raise ValueError(f"no hook points given; {_VALID_FORMS}")
    parts = model_parts(model)
    return [_resolve(model, parts, n) for n in hook_points]


# --------------------------------------------------------------------------- hooks


def _checked(site: HookSite, old: Tensor, new) -> Tensor:
    if not isinstance(new, Tensor):
        raise TypeError(f"the function for hook point {site.name!r} must return a Tensor, got {type(new).__name__}")
    if new.shape != old.shape:
        raise ValueError(
            f"the function for hook point {site.name!r} returned shape {tuple(new.shape)}, "
            f"expected {tuple(old.shape)} (the activation's shape); a replacement must keep the shape"
        )
    if new.dtype != old.dtype or new.device != old.device:
        new = new.to(device=old.device, dtype=old.dtype)
    return new


def register_hook(
    model: nn.Module,
    hook_point: str | HookSite,
    fn: Callable[[Tensor], Tensor | None],
    *,
    prepend: bool = False,
) -> RemovableHandle:
    """Register ``fn(act)`` at a hook point; the low-level building block of capture and splice.

    ``act`` is the activation [B, T, dim]. If ``fn`` returns ``None`` (or ``act`` itself) the
    forward is unchanged; if it returns a tensor, that tensor replaces the activation for the
    rest of the forward (same shape required, else ``ValueError``; it is cast to the
    activation's dtype/device). ``prepend=True`` runs ``fn`` before hooks already registered
    on the module. The caller must call ``handle.remove()`` (use try/finally).
    """
    site = hook_point if isinstance(hook_point, HookSite) else resolve_hook_point(model, hook_point)
    if site.io == "input":

        def pre_hook(module, args, kwargs):
            if site.arg_index < len(args):
                act, where = args[site.arg_index], "arg"
            elif site.kwarg_name is not None and site.kwarg_name in kwargs:
                act, where = kwargs[site.kwarg_name], "kwarg"
            else:
                raise RuntimeError(
                    f"hook point {site.name!r}: {site.module_path} was called without its input "
                    f"(neither positional argument {site.arg_index} nor keyword {site.kwarg_name!r})"
                )
            new = fn(act)
            if new is None or new is act:
                return None
            new = _checked(site, act, new)
            if where == "arg":
                args = args[: site.arg_index] + (new,) + args[site.arg_index + 1 :]
            else:
                kwargs = {**kwargs, site.kwarg_name: new}
            return args, kwargs

        return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=prepend)

    def fwd_hook(module, args, kwargs, output):
        if isinstance(output, Tensor):
            act = output
        elif isinstance(output, (tuple, list)) and len(output) > site.output_index:
            act = output[site.output_index]
        else:
            raise TypeError(
                f"hook point {site.name!r}: {site.module_path} returned {type(output).__name__}, "
                "expected a Tensor or a tuple whose first element is the hidden states"
            )
        new = fn(act)
        if new is None or new is act:
            return None
        new = _checked(site, act, new)
        if isinstance(output, Tensor):
            return new
        items = list(output)
        items[site.output_index] = new
        if type(output) is tuple:
            return tuple(items)
        if type(output) is list:
            return items
        return type(output)(*items)

    return site.module.register_forward_hook(fwd_hook, with_kwargs=True, prepend=prepend)


class _StopForward(Exception):
    """Raised inside a capture hook to abort the forward once every requested value is captured."""


@contextmanager
def capture(
    model: nn.Module,
    hook_points: Sequence[str],
    stop_early: bool = True,
    detach: bool = True,
) -> Iterator[dict[str, Tensor]]:
    """Record activations at ``hook_points`` during forwards run inside the block.

    Yields a dict ``{hook_point: Tensor [B, T, dim]}`` filled (and overwritten) by each forward.
    Tensors are the model's own (no copy), detached if ``detach`` (keep ``detach=False`` to take
    gradients with respect to them, e.g. ``act.retain_grad()`` for attribution patching).

    With ``stop_early`` the forward is aborted as soon as every requested hook point has
    fired, so harvesting layer 6 of a 30-layer model runs 7 blocks; ``model(...)`` then returns
    ``None`` (only the top-level call on ``model`` is wrapped; an abort raised through another
    entry point ends the ``with`` body, silently). Do not nest two ``stop_early`` captures:
    ask one capture for all hook points. Capture hooks run after splice hooks on the same
    module, so inside :func:`splice` they see the replaced value. All hooks (and the forward
    wrapper) are removed on exit, also on exceptions.

    Positions masked out by ``attention_mask`` (padding) are captured too; drop them yourself.
    With accelerate CPU/disk offload, an aborted forward skips the offload hooks of the modules
    it was inside (their weights stay on the execution device until their next call).
    """
    sites = _resolve_many(model, hook_points)
    names = [s.name for s in sites]
    store: dict[str, Tensor] = {}
    pending: set[str] = set(names)
    handles: list[RemovableHandle] = []

    def make_fn(name: str):
        def fn(act: Tensor):
            store[name] = act.detach() if detach else act
            if stop_early:
                pending.discard(name)
                if not pending:
                    pending.update(names)
                    raise _StopForward(name)
            return None

        return fn

    had_forward = "forward" in model.__dict__
    old_forward = model.__dict__.get("forward")
    try:
        for site in sites:
            handles.append(register_hook(model, site, make_fn(site.name)))
        if stop_early:
            inner = model.forward

            @functools.wraps(inner)
            def forward_until_captured(*args, **kwargs):
                pending.clear()
                pending.update(names)
                try:
                    return inner(*args, **kwargs)
                except _StopForward:
                    return None

            model.forward = forward_until_captured
        try:
            yield store
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
        if stop_early:
            if had_forward:
                model.forward = old_forward
            else:
                model.__dict__.pop("forward", None)


def run_with_capture(
    model: nn.Module,
    input_ids: Tensor,
    hook_points: Sequence[str],
    attention_mask: Tensor | None = None,
    stop_early: bool = True,
    detach: bool = True,
    **forward_kwargs,
) -> dict[str, Tensor]:
    """Run ``model(input_ids, attention_mask, **forward_kwargs)`` and return the activations.

    Args:
        input_ids: token ids, LongTensor [B, T] on the model's (first) device.
        hook_points: hook-point names (a single string is accepted too).
        attention_mask: optional [B, T] mask (1 = real token).
        stop_early: abort the forward right after the deepest requested hook point fires.
        detach: detach the returned tensors (gradients are the caller's choice: wrap the call in
            ``torch.no_grad()`` for harvesting).
        forward_kwargs: passed to the forward; ``use_cache`` defaults to False.

    Returns ``{hook_point: Tensor [B, T, dim]}``. Never leaves hooks registered.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got {shape} (use ids[None] for one sequence)")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    wanted = [hook_points] if isinstance(hook_points, str) else list(dict.fromkeys(hook_points))
    forward_kwargs.setdefault("use_cache", False)
    if attention_mask is not None:
        forward_kwargs["attention_mask"] = attention_mask
    with capture(model, wanted, stop_early=stop_early, detach=detach) as acts:
        model(input_ids=input_ids, **forward_kwargs)
    missing = [n for n in wanted if n not in acts]
    if missing:
        raise RuntimeError(f"the forward of {_model_name(model)} never reached hook points {missing}")
    return {n: acts[n] for n in wanted}


@contextmanager
def splice(model: nn.Module, replacements: Mapping[str, Callable[[Tensor], Tensor]]) -> Iterator[None]:
    """Replace activations: inside the block, the value at each hook point becomes ``fn(act)``.

    ``fn`` maps [B, T, dim] to the same shape (else ``ValueError`` naming the hook point and
    both shapes); its output is cast to the activation's dtype/device and gradients flow
    through it. ``embed``/``resid_pre``/``resid_post`` change the residual stream seen by the
    rest of the model; ``attn_out``/``mlp_out`` change what is added to the residual;
    ``attn_z`` changes the input of the attention output projection. Splice hooks are
    prepended, so other hooks on the same module (``output_hidden_states`` recorders,
    :func:`capture`) see the replaced value. Hooks are removed on exit, also on exceptions.

    Example (downstream loss of an SAE)::

        with splice(model, {"layers.6.resid_post": lambda x: sae(x).reconstruction}):
            loss = model(input_ids, labels=input_ids).loss
    """
    if not isinstance(replacements, Mapping):
        raise ValueError("replacements must be a mapping {hook_point: fn}")
    for n, fn in replacements.items():
        if not callable(fn):
            raise ValueError(f"replacement for hook point {n!r} is not callable: {fn!r}")
    sites = _resolve_many(model, list(replacements)) if replacements else []
    handles: list[RemovableHandle] = []
    try:
        # Each is prepended; registering deepest first makes same-module splices run in forward
        # order (``embed`` before ``layers.0.resid_pre``).
        for site in sorted(sites, key=lambda s: hook_point_sort_key(s.name), reverse=True):
            handles.append(register_hook(model, site, replacements[site.name], prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()
