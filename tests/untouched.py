"""`Untouched`: a fingerprint of everything a refused call must leave as it was.

Every tensor of the state dict (hashed, with dtype and shape), every module's class, every hook
dict of every module, and every parameter's requires_grad flag; optionally files, by content hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest() + f"{data.dtype}{tuple(data.shape)}"


def fingerprint(model: nn.Module) -> dict:
    return {
        "tensors": {k: _digest(v) for k, v in model.state_dict(keep_vars=True).items()},
        "classes": {name: type(m) for name, m in model.named_modules()},
        "hooks": {name: {h: tuple(getattr(m, h, {}).keys()) for h in _HOOKS} for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "attributes": {name: sorted(vars(m)) for name, m in model.named_modules()},
    }


class Untouched:
    """`with Untouched(model, *files):` asserts on exit (also after an expected exception is caught
    inside the block) that the model and the files are exactly as they were on entry."""

    def __init__(self, model: nn.Module, *files: Path) -> None:
        self.model, self.files = model, [Path(f) for f in files]

    def _files(self) -> dict[str, str]:
        return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "absent" for f in self.files}

    def __enter__(self) -> "Untouched":
        self.before, self.before_files = fingerprint(self.model), self._files()
        return self

    def check(self) -> None:
        after = fingerprint(self.model)
        for part, value in self.before.items():
            assert after[part] == value, f"{part} changed: " + str(
                {k: (value.get(k), after[part].get(k)) for k in set(value) | set(after[part])
                 if value.get(k) != after[part].get(k)})
        assert self._files() == self.before_files, "a file changed"

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.check()
