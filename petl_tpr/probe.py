"""Inject-time probes: call an attention module alone, before anything is attached, to refuse early.

Two things are checked where the module can be called with one hidden-state tensor (timm's
`Attention(x)`, transformers' `...Attention(hidden_states)`, `MultiheadAttention(x, x, x)`):

- takeover identity: the taken-over forward (with no adapter) must give the module's own output at
  fp32 tolerance. A module that adds something the convention does not reproduce (a relative
  position bias table, split q/k/v biases, a rotary embedding of its own, talking heads) is
  refused, naming the module and the parts the convention does not know.
- bypassed projections: a projection that gets a forward hook (LoRA on a Linear) must be called
  by its attention. timm's EVA and BEiT attentions read `qkv.weight` through `F.linear` instead of
  calling `qkv`: a hook there would never run.

A module that cannot be called alone (it needs rotary position embeddings or a mask as required
arguments) is not probed here; the first-forward run check (runcheck.py) still catches a bypass.
Probes run in eval mode under no_grad on a seeded input and leave the module as it was.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .attention import CONVENTIONS, is_taken_over as _taken, release, state_of, take_over
from .attention.intercept import count_sdpa
from .backbones.layout import is_conv1d
from .errors import UnsupportedError
from .registry import METHODS
from .targeting import takeover_path
from .weight_site import reads_attribute

ATOL = 1e-5

# what each convention's forward reads of its module (anything else it does not reproduce)
_KNOWN_PARTS = {
    "hf": {"q_proj", "k_proj", "v_proj", "out_proj", "o_proj", "query", "key", "value", "dropout", "attn_dropout",
           "attention_dropout"},
    "timm": {"qkv", "proj", "q_norm", "k_norm", "norm", "attn_drop", "proj_drop", "gate"},
    "hf_rotary": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "hf_fused": {"qkv", "projection", "dropout"},
    "hf_deberta": {"query_proj", "key_proj", "value_proj", "pos_key_proj", "pos_query_proj", "pos_dropout", "dropout"},
    "hf_relbias": {"query", "key", "value", "dropout", "relative_position_bias"},
    "mha": {"in_proj_weight", "in_proj_bias", "out_proj", "q_proj_weight", "k_proj_weight", "v_proj_weight",
            "bias_k", "bias_v"},
}

# the forward arguments each convention reads (a module whose forward takes others is refused when probing is impossible)
_KNOWN_ARGS = {
    "hf": {"hidden_states", "attention_mask", "args", "kwargs", "output_attentions", "is_causal", "position_ids",
           "use_cache", "cache_position", "past_key_values", "past_key_value", "cache", "encoder_hidden_states",
           "encoder_attention_mask", "head_mask", "layer_head_mask"},
    "timm": {"x", "attn_mask", "is_causal"},
    "hf_fused": {"hidden_states", "kwargs", "output_attentions"},
    "hf_deberta": {"hidden_states", "attention_mask", "output_attentions", "query_states", "relative_pos",
                   "rel_embeddings"},
    "hf_rotary": {"hidden_states", "position_embeddings", "attention_mask", "kwargs", "cache", "past_key_values",
                  "past_key_value", "cache_position", "position_ids", "output_attentions", "use_cache"},
    "hf_relbias": {"hidden_states", "output_attentions", "relative_position_bias", "interpolate_pos_encoding",
                   "resolution"},
    "mha": {"query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
            "is_causal"},
}


def unknown_args(module: nn.Module, convention: str) -> list[str]:
    """Forward arguments of `module` that `convention` does not read (rotary embeddings, a shared bias...)."""
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []
    return [n for n in names if n not in _KNOWN_ARGS.get(convention, set())]


def unknown_parts(module: nn.Module, convention: str) -> list[str]:
    """Children, parameters and buffers of `module` that `convention`'s forward never reads."""
    known = _KNOWN_PARTS.get(convention, set())
    parts = [f"{n} ({type(c).__name__})" for n, c in module.named_children()
             if n not in known and not isinstance(c, (nn.Dropout, nn.Identity))]
    parts += [f"{n} (parameter {tuple(p.shape)})" for n, p in module.named_parameters(recurse=False)
              if n not in known]
    parts += [f"{n} (buffer)" for n, b in module.named_buffers(recurse=False) if n not in known]
    return parts


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    return out if isinstance(out, torch.Tensor) else None


def _call(module: nn.Module, convention: str, x: torch.Tensor):
    """Call an attention as its model would with hidden states `x (B, L, d)` (seeded rotary cos/sin too)."""
    if convention == "mha":
        return module(x, x, x, need_weights=False)
    if convention == "hf_rotary":
        g = torch.Generator().manual_seed(4321)
        dh = module.head_dim
        angles = torch.randn(x.shape[0], x.shape[1], dh // 2, generator=g).repeat(1, 1, 2).to(x)
        return module(x, position_embeddings=(angles.cos(), angles.sin()))
    if convention == "hf_relbias" and getattr(module, "has_relative_position_bias", False):
        window = module.relative_position_bias.window_size
        return module(x, resolution=(window[0] * module.config.patch_size, window[1] * module.config.patch_size))
    return module(x)


def _call_alone(module: nn.Module, convention: str, x: torch.Tensor) -> torch.Tensor | None:
    """The module's output for one hidden-state input, or None when it cannot be called that way."""
    try:
        out = _call(module, convention, x)
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError, KeyError):
        return None
    return _first_tensor(out)


def _shapes(module: nn.Module, width: int) -> list[tuple[int, ...]]:
    """Hidden-state shapes to probe with: `(2, L, d)` for a short length and a window's token count (+1 for a
    class token), then a `(2, h, w, d)` grid (torchvision's Swin attention takes its positions on one)."""
    window = next((getattr(m, "window_size") for m in module.modules() if isinstance(getattr(m, "window_size", None),
                                                                                      (tuple, list))), None)
    if window is None and getattr(module, "has_relative_position_bias", False):   # BEiT-style: window of its table
        window = getattr(module.relative_position_bias, "window_size", None)
    if isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) for w in window):
        return [(2, 5, width), (2, window[0] * window[1] + 1, width), (2, window[0] * window[1], width),
                (2, window[0], window[1], width)]
    return [(2, 5, width), (2, 4, 4, width)]


def _probe_input(module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(1234)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


class _Called:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.count += 1


def _softmax_in_source(module: nn.Module) -> bool:
    """Whether `module`'s forward computes a softmax in its own code and never names SDPA (source read as text)."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return "softmax" in source and "scaled_dot_product_attention" not in source


def _no_sdpa(finding: str) -> str:
    """Why the `sdpa` takeover cannot serve a module either; `finding` says what was seen."""
    return (f"{finding}, so its own forward cannot carry key/value prefixes either (they are given at its one "
            f"torch.nn.functional.scaled_dot_product_attention call). Target "
            f"roles that need no takeover (LoRA on Linear projections, adapters), build the model with an SDPA attention "
            f"where it has one (transformers: attn_implementation='sdpa'), or add a convention (docs/adding.md)")


@torch.no_grad()
def check_attention(model: nn.Module, path: str, convention: str | None, width: int, hooked: list[str],
                    takeover: bool, weightable: frozenset[str] = frozenset()) -> tuple[set[str], str | None]:
    """Probe the attention at `path`; raise UnsupportedError naming what the takeover or a hook would miss.

    `hooked` are module paths (inside the attention) that will get forward hooks; `takeover` says
    whether the spec needs the attention taken over. Returns the hooked modules the attention does
    not call but whose `weight` it reads, when all their sites are in `weightable` (mergeable
    deltas): those are attached at the weight instead (weight_site.py); and the convention that
    takes it over: the family's, or `sdpa` (its own forward, prefixes given at its one SDPA call)
    where the family's does not reproduce the module but the module calls SDPA once.
    """
    module = model.get_submodule(path)
    was_training = module.training
    module.eval()
    who = f"'{path}' ({type(module).__name__})"
    own_hooks = _suspend_hooks(module)   # a block taken over whole may carry an earlier set's side-network taps
    try:
        counters = {owner: _Called() for owner in hooked}
        handles = [model.get_submodule(owner).register_forward_hook(c) for owner, c in counters.items()]
        try:
            for shape in _shapes(module, width):
                x = _probe_input(module, shape)
                own, calls = count_sdpa(lambda: _call_alone(module, convention or "", x))
                if own is not None:
                    break
        finally:
            for handle in handles:
                handle.remove()
        if _taken(module):   # a taken-over module was probed when taken
            return set(), state_of(module).convention.name
        if own is None:   # cannot be called alone: judge by structure (the sdpa takeover checks its call at forward)
            if takeover and convention == "sdpa" and _softmax_in_source(module):
                raise UnsupportedError(f"attention {who} has no takeover convention in its family; " + _no_sdpa(
                    "it cannot be called alone to be probed, and its forward computes a softmax in its own code"))
            if takeover and convention not in (None, "sdpa"):
                missing = unknown_parts(module, convention) + [f"argument {a!r}" for a in unknown_args(module, convention)]
                if missing:
                    raise UnsupportedError(
                        f"attention {who} has parts the {convention!r} takeover does not reproduce: "
                        f"{', '.join(missing)}; prefixes or raw-weight deltas there would change the model. Target roles "
                        f"that need no takeover (LoRA on Linear projections, adapters), or add a convention "
                        f"(docs/adding.md)")
            return set(), convention
        bypassed = [owner for owner, c in counters.items() if c.count == 0]
        at_weight = {b for b in bypassed if b in weightable and not is_conv1d(model.get_submodule(b))
                     and reads_attribute(model, b, "weight", lambda: _call_alone(module, convention or "", x))}
        bypassed = [b for b in bypassed if b not in at_weight]
        if bypassed and not takeover:
            raise UnsupportedError(
                f"attention {who} does not call {', '.join(repr(b) for b in bypassed)} in its forward (it reads the "
                f"weight directly), so an adapter hooked there would never run. Parts of the module the convention "
                f"does not read: {', '.join(unknown_parts(module, convention or '')) or 'none'}")
        if not takeover or convention is None:
            return at_weight, convention
        if convention == "sdpa":
            if calls != 1:
                raise UnsupportedError(f"attention {who} has no takeover convention in its family; " + _no_sdpa(
                    f"it calls SDPA {calls} times in a probe forward (it computes attention itself, e.g. an eager softmax)"))
            return at_weight, convention
        try:
            _check_identity(module, convention, x, own, who)
        except UnsupportedError as error:
            if calls == 1:
                return at_weight, "sdpa"
            raise UnsupportedError(f"{error}; " + _no_sdpa(f"it calls SDPA {calls} times in a probe forward")) from None
        return at_weight, convention
    finally:
        module.train(was_training)
        _restore_hooks(module, own_hooks)


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs")


def _suspend_hooks(module: nn.Module) -> dict[str, Any]:
    """Take `module`'s own forward hooks off it (returned, for `_restore_hooks`): the probe calls the module alone,
    and a hook with state (a side network's tap) must not see that call."""
    saved = {name: getattr(module, name) for name in _HOOK_DICTS if hasattr(module, name)}
    for name, hooks in saved.items():
        setattr(module, name, type(hooks)())
    return saved


def _restore_hooks(module: nn.Module, saved: dict[str, Any]) -> None:
    for name, hooks in saved.items():
        setattr(module, name, hooks)


def _check_identity(module: nn.Module, convention: str, x: torch.Tensor, own: torch.Tensor, who: str) -> None:
    """The taken-over forward (no adapter) must give `own`, the module's output for `x`."""
    take_over(module, CONVENTIONS[convention])
    try:
        try:
            ours = _first_tensor(_call(module, convention, x))
        except Exception as error:   # the takeover cannot run what the module itself runs
            raise UnsupportedError(f"attention {who}: the {convention!r} takeover fails where the module's own "
                                   f"forward works ({type(error).__name__}: {error})") from None
    finally:
        release(module)
    if ours is None or ours.shape != own.shape or not torch.allclose(ours, own, atol=ATOL, rtol=1e-4):
        gap = (ours - own).abs().max().item() if ours is not None and ours.shape == own.shape else float("nan")
        parts = unknown_parts(module, convention)
        raise UnsupportedError(
            f"attention {who} computes something the {convention!r} takeover does not reproduce (max difference "
            f"{gap:.2e} on a probe input), so prefixes or raw-weight deltas there would change the model. "
            f"Parts the takeover does not read: {', '.join(parts) or 'none (the forward itself differs)'}")


def check_planned(model: nn.Module, backbone, planned: list) -> list:
    """Probe every attention the planned sites touch (takeover or hooked projections inside it).

    Returns `planned` with the delta sites whose projection the attention bypasses but whose weight
    it reads turned into weight sites (slot "weight", weight_site.py); raises for any other bypass.
    """
    weightable: dict[str, bool] = {}
    for site in planned:
        att = site.attachment
        if att.side is None and att.attention is None:
            ok = att.slot == "delta" and att.param is None and METHODS[att.method].mergeable and not getattr(
                site.entry.config, "dropout", 0.0)
            weightable[att.owner] = weightable.get(att.owner, True) and ok
    todo: dict[str, dict] = {}
    for site in planned:
        att = site.attachment
        if att.side is not None:
            continue
        block = backbone.branches[att.branch].blocks[att.layer]
        path = takeover_path(model, block)
        item = todo.setdefault(path, {"convention": block.layout.attention, "width": block.dim, "hooked": set(),
                                      "takeover": False})
        if att.attention == path:      # the convention targeting chose (the family's, a recognised one, or sdpa)
            item["takeover"], item["convention"] = True, att.convention
        elif att.owner.startswith(path + "."):
            item["hooked"].add(att.owner)
    at_weight: set[str] = set()
    chosen: dict[str, str | None] = {}
    for path, item in todo.items():
        if item["takeover"] or item["hooked"]:
            weights, chosen[path] = check_attention(model, path, item["convention"], item["width"], sorted(item["hooked"]),
                                                    item["takeover"], frozenset(o for o, ok in weightable.items() if ok))
            at_weight |= weights
    out = []
    for site in planned:
        att = site.attachment
        if att.owner in at_weight and att.attention is None and att.side is None:
            att = replace(att, slot="weight")
        elif att.attention is not None and chosen.get(att.attention, att.convention) != att.convention:
            if att.slot != "kv":
                raise UnsupportedError(f"entry {att.entry!r} ({att.method}): the attention '{att.attention}' can carry "
                                       f"prefixes only through its own SDPA call, and {att.key} is a raw weight that "
                                       f"needs a takeover computing the projections")
            att = replace(att, convention=chosen[att.attention])
        out.append(replace(site, attachment=att))
    return out
