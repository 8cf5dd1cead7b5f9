"""torch.compile and hooks: adapters attach through hooks, and dynamo must see them change.

By default dynamo does not guard on module hooks (`torch._dynamo.config.skip_nnmodule_hook_guards`),
so a graph compiled for a model without adapters (or before `merge` removed some) can be reused for
a model of the same class that has them: the adapters would be skipped silently. `inject`, `merge`
and `eject` call `guard_hooks()` first: from then on dynamo guards on hooks (somewhat slower guard
checks), and graphs compiled before, without those guards, are dropped once (`torch.compiler.reset()`),
so they are recompiled on their next call.
"""

from __future__ import annotations

import torch


def guard_hooks() -> None:
    """Make dynamo guard on module hooks, dropping graphs compiled without those guards (once)."""
    config = getattr(getattr(torch, "_dynamo", None), "config", None)
    if config is not None and getattr(config, "skip_nnmodule_hook_guards", False):
        config.skip_nnmodule_hook_guards = False
        torch.compiler.reset()
