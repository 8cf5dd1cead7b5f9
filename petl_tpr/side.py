"""Side networks (UniPT): taps hand a branch's hidden states, detached, to a module beside it.

A side attachment (`slot == "side"`) has
- a forward pre-hook on the first block (its input is the embedding output H_0) and forward
  hooks on the selected blocks (their outputs H_1..H_n), each storing a detached tensor;
- with `global_token` "eot" or "eos", a pre-hook on the token embedding that keeps the token ids;
- a forward hook on the branch's final norm (or its last block when it has none, or the
  attention-pooling head whose output is the pooled feature) that calls the side module and adds
  its correction where the model pools (backbones/pooling.py: CLS at position 0; CLIP's EOT at
  the largest id or the first end-of-text id; SigLIP text's last position; every position for a
  mean-pooling model), or to the whole output when that module sees the pooled `(B, D)` feature
  already (transformers' CLIP vision tower, a SigLIP pooling head, timm's `fc_norm`);
- for a branch whose model does not pool (kind "none"), a correction at every position, each
  position reading the keys the model lets it see: the 4-d `attention_mask` the first block is given
  (a transformers decoder passes its causal and padding mask there), else the `(B, N)` padding mask
  given to the nearest ancestor whose forward takes `attention_mask` (a pre-hook keeps it); and a
  causal model (an attention with `is_causal`, a causal mask buffer) lets position i read positions
  <= i only in any case.
Because the taps are detached and the backbone is frozen, autograd records nothing inside the
backbone: training keeps no backbone activations for backward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InjectionError
from .sets import acts, row_index, spread_rows


@dataclass(frozen=True)
class SideSite:
    """Where a side network reads and writes, resolved by targeting (plain paths)."""

    first_block: str               # its input is the embedding output H_0
    taps: tuple[str, ...]          # blocks whose outputs are H_1..H_n
    owner: str                     # final norm (or last block) whose output gets the correction
    ids: str | None                # token embedding, when the global token is EOT
    global_token: str              # where the model pools: backbones/pooling.py kinds
    batch_first: bool              # False for sequence-first (L, B, D) hidden states
    eos_id: int | None = None      # global_token "eos": the token id pooled at
    mask_from: str | None = None   # global_token "none": module whose `attention_mask` argument is the padding mask
    causal: bool = False           # global_token "none": position i sees positions <= i only
    repeats: int = 1               # calls of each tapped block per forward (ALBERT: one layer at every position)
    start: str | None = None       # the module that runs the stack (its pre-hook starts a run afresh)


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, (tuple, list)):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise InjectionError(f"a side-network tap got {type(value).__name__}, not a tensor")
    return value


class SideState:
    """What the taps of one side attachment collected in the current forward."""

    def __init__(self, taps: int) -> None:
        self.hidden: list[torch.Tensor | None] = [None] * (taps + 1)
        self.ids: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None     # (B, N) padding mask of this forward (kind "none")
        self.block_mask: torch.Tensor | None = None   # 4-d mask the first block was given (padding and causal order)
        self.handles: list[Any] = []
        self.applied = False       # the correction was added in this forward (reset by the first block)

    def reset(self) -> None:
        """Forget the block taps of an unfinished run (the token ids and the padding mask are taken before the
        stack runs, by hooks outside it, and stay)."""
        self.hidden = [None] * len(self.hidden)
        self.block_mask, self.applied = None, False

    def take(self, partial_ok: bool = False) -> tuple[list[torch.Tensor], torch.Tensor | None] | None:
        """The taps of this forward; None when the correction was added already in this forward and no
        block ran since (the end module called again, as BLIP's vision tower calls its final norm on
        the pooled token a second time), or, with `partial_ok` (an end block that runs at several layer
        positions), while some layer position has not run yet."""
        if self.applied and all(h is None for h in self.hidden):
            return None
        if any(h is None for h in self.hidden):
            if partial_ok:
                return None
            raise InjectionError("the side network ran before every tapped block did")
        hidden, ids = self.hidden, self.ids
        self.hidden, self.ids = [None] * len(hidden), None
        self.applied = True
        return hidden, ids


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states as `(B, N, D)`: a `(B, H, W, D)` grid (timm and torchvision Swin) has its positions flattened."""
    return hidden.flatten(1, -2) if hidden.dim() > 3 else hidden


def _with_first(output: Any, new: torch.Tensor) -> Any:
    """`output` with its tensor (or its first element, for a tuple or list output) replaced by `new`."""
    if isinstance(output, (tuple, list)):
        return type(output)([new, *output[1:]]) if isinstance(output, list) else (new, *output[1:])
    return new


_PARAMETERS: dict[type, dict[str, int]] = {}


def _argument(module: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    """The argument `name` of a call of `module`'s forward (by keyword or by position), or None."""
    if name in kwargs:
        return kwargs[name]
    cls = getattr(type(module), "_petl_original_class", type(module))    # a taken-over module: its own forward
    if cls not in _PARAMETERS:
        try:
            names = list(inspect.signature(cls.forward).parameters)[1:]     # without self
        except (TypeError, ValueError):
            names = []
        _PARAMETERS[cls] = {n: i for i, n in enumerate(names)}
    index = _PARAMETERS[cls].get(name)
    return args[index] if index is not None and index < len(args) else None


def _visible(mask: torch.Tensor | None, causal: bool, b: int, n: int, device: torch.device) -> torch.Tensor | None:
    """`(B, N, N)` bool: which keys position i reads, or None for all.

    `mask` is the model's `attention_mask`: `(B, N)` (1 = a token, 0 = padding), or the 4-d form a
    transformers encoder receives, `(B, 1, 1 or N, N)`, bool (True = may attend) or additive float
    (0 = may attend, a large negative number = may not). A causal order hides later positions too.
    """
    seen = None
    if mask is not None:
        mask = mask.to(device)
        if mask.dim() == 4 and mask.shape[0] == b and mask.shape[1] == 1 and mask.shape[-1] == n \
                and mask.shape[2] in (1, n):
            keep = mask[:, 0] if mask.dtype == torch.bool else (mask[:, 0] > -1) if mask.is_floating_point() \
                else mask[:, 0] != 0
            seen = keep.expand(b, n, n)
        elif tuple(mask.shape) == (b, n):
            seen = mask.bool()[:, None, :].expand(b, n, n)
        else:
            raise InjectionError(f"a side network correcting every position reads the model's attention_mask as a "
                                 f"(batch, length) = ({b}, {n}) padding mask or its (batch, 1, 1 or length, length) "
                                 f"form, but got one of shape {tuple(mask.shape)}")
    if causal:
        order = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None].expand(b, n, n)
        seen = order if seen is None else seen & order
    return seen


class Tap:
    """A hook object (not a closure, so `copy.deepcopy` of a model gives the copy its own taps).

    kind "input": pre-hook keeping a block's input as hidden[index]; "output": forward hook keeping
    a block's output; "ids": pre-hook keeping the token ids given to the token embedding; "mask":
    pre-hook keeping the `attention_mask` argument of a model's forward (None when not given);
    "start": pre-hook on the module that runs the stack, clearing what an unfinished run left.
    A block run at `repeats` layer positions per forward (ALBERT) fills `repeats` entries, in call order.
    """

    def __init__(self, state: SideState, kind: str, index: int = 0, repeats: int = 1) -> None:
        self.state, self.kind, self.index, self.repeats = state, kind, index, repeats

    def __call__(self, module: nn.Module, args: tuple, third: Any) -> None:
        if self.kind == "mask":
            self.state.mask = _argument(module, args, third, "attention_mask")
            return
        if self.kind == "start":  # the stack's container begins a run: nothing of an earlier, unfinished run is kept
            self.state.reset()
            return
        if self.repeats > 1:      # a block run at several layer positions: its calls fill hidden[index:index+repeats]
            if self.kind == "input" and self.state.hidden[0] is not None:
                return            # a later layer position of this forward: H_0 is its first input
            free = [i for i in range(self.index, self.index + self.repeats) if self.state.hidden[i] is None]
            if self.kind == "output" and free:
                self.state.hidden[free[0]] = _positions(_tensor(third).detach())
                return
        if self.kind != "ids" and self.state.hidden[self.index] is not None:
            raise InjectionError("a block tapped by a side network ran twice in one forward (one layer's weights shared "
                                 "by several layer positions, as in ALBERT, or a final norm called twice): the side "
                                 "network cannot tell the calls apart; side networks do not serve this model")
        if self.kind == "output":
            self.state.hidden[self.index] = _positions(_tensor(third).detach())
            return
        if self.kind == "input":
            self.state.applied = False
            given = _argument(module, args, third, "attention_mask")    # the mask a decoder gives its layers
            self.state.block_mask = given if isinstance(given, torch.Tensor) and given.dim() == 4 else None
        value = args[0] if args else next(v for v in third.values() if isinstance(v, torch.Tensor))
        if self.kind == "ids":
            self.state.ids = value
        else:
            self.state.hidden[self.index] = _positions(_tensor(value).detach())


class SideOutput:
    """Forward hook on the branch's last module: adds the side module's correction."""

    def __init__(self, adapter: nn.Module, state: SideState, site: SideSite) -> None:
        self.adapter, self.state, self.global_token, self.batch_first = adapter, state, site.global_token, site.batch_first
        self.eos_id, self.causal, self.repeats = site.eos_id, site.causal, site.repeats

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        out = _tensor(output)
        taken = self.state.take(self.repeats > 1)    # taken even when its set is inert: one forward's taps
        if taken is None:
            return output
        hidden, ids = taken
        if not acts(self.adapter):
            return output
        shape = out.shape
        if out.dim() > 3:                  # (B, H, W, C) positions on a grid (timm, torchvision Swin): flattened
            out = out.flatten(1, -2)
        elif not self.batch_first:
            hidden = [h.transpose(0, 1) for h in hidden]
            out = out.transpose(0, 1) if out.dim() == 3 else out
        new = self._every_position(out, hidden) if self.global_token == "none" else self._pooled(out, hidden, ids)
        if not self.batch_first and new.dim() == 3 and len(shape) == 3:
            new = new.transpose(0, 1)
        return _with_first(output, new.reshape(shape))

    def _pooled(self, out: torch.Tensor, hidden: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        """`out` `(B, N, D)` (or the pooled `(B, D)`) with the correction where the model pools."""
        b = out.shape[0]
        index = torch.zeros(b, dtype=torch.long, device=out.device)
        valid = None
        if self.global_token in ("eot", "eos"):
            if ids is None:
                raise InjectionError("the side network needs the token ids (EOT position), but the token embedding "
                                     "was not called in this forward")
            index = ids.argmax(dim=-1) if self.global_token == "eot" else (ids == self.eos_id).int().argmax(dim=-1)
            valid = torch.arange(ids.shape[-1], device=ids.device)[None] <= index[:, None]
        elif self.global_token == "last" and out.dim() == 3:
            index = torch.full((b,), out.shape[1] - 1, dtype=torch.long, device=out.device)
        mean = self.global_token == "mean" and out.dim() == 3
        if out.dim() == 2:
            pooled = out
        elif mean:
            pooled = out.mean(dim=1)
        else:
            pooled = out[torch.arange(b, device=out.device), index]
        rows = row_index(self.adapter, pooled, 0, "a side network's output")
        if rows is None:
            correction = self.adapter(pooled.detach(), hidden, index, valid).to(out.dtype)
        else:      # per-sample sets: this side network runs on its own rows only
            part = self.adapter(pooled.detach()[rows], [h[rows] for h in hidden], index[rows],
                                None if valid is None else valid[rows])
            correction = spread_rows(part, rows, 0, b).to(out.dtype)
        if out.dim() == 2:
            return out + correction
        if mean:        # the model averages every position: the same correction at each moves the mean by it
            return out + correction[:, None, :]
        place = torch.nn.functional.one_hot(index, out.shape[1]).to(out.dtype)
        return out + place[:, :, None] * correction[:, None, :]

    def _every_position(self, out: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        """A model that does not pool: each position of `out (B, N, D)` gets its own correction."""
        b, n = out.shape[0], out.shape[1]
        mask = self.state.block_mask if self.state.block_mask is not None else self.state.mask
        visible = _visible(mask, self.causal, b, n, out.device)
        self.state.mask = self.state.block_mask = None
        rows = row_index(self.adapter, out, 0, "a side network's output")
        if rows is None:
            correction = self.adapter(out.detach(), hidden, None, visible)
        else:      # per-sample sets: this side network runs on its own rows only
            part = self.adapter(out.detach()[rows], [h[rows] for h in hidden], None,
                                None if visible is None else visible[rows])
            correction = spread_rows(part, rows, 0, b)
        return out + correction.to(out.dtype)


def attach_side(model: nn.Module, adapter: nn.Module, site: SideSite) -> None:
    """Register the taps and the output hook of one side network (handles kept on the adapter)."""
    if site.global_token in ("eot", "eos") and site.ids is None:
        raise InjectionError("this branch pools its feature at the EOT token, but no token embedding was found")
    r = site.repeats
    state = SideState(len(site.taps) * r)
    hooks = [model.get_submodule(site.start).register_forward_pre_hook(Tap(state, "start"), with_kwargs=True)] if site.start is not None \
        else []
    hooks.append(model.get_submodule(site.first_block).register_forward_pre_hook(Tap(state, "input", 0, r),
                                                                                with_kwargs=True))
    hooks += [model.get_submodule(path).register_forward_hook(Tap(state, "output", 1 + i * r, r))
              for i, path in enumerate(site.taps)]
    if site.global_token in ("eot", "eos"):
        hooks.append(model.get_submodule(site.ids).register_forward_pre_hook(Tap(state, "ids"), with_kwargs=True))
    if site.mask_from is not None:
        hooks.append(model.get_submodule(site.mask_from).register_forward_pre_hook(Tap(state, "mask"),
                                                                                  with_kwargs=True))
    hooks.append(model.get_submodule(site.owner).register_forward_hook(SideOutput(adapter, state, site)))
    state.handles = hooks
    adapter.__dict__["_petl_side_state"] = state


def detach_side(adapter: nn.Module) -> None:
    state: SideState = adapter.__dict__.pop("_petl_side_state")
    for handle in state.handles:
        handle.remove()
