"""Sizes of planned adapters, known before anything is built: checkpoint checks and the "cannot fit" refusal.

Every method reports the shape of each parameter it would create from its config and a site's
dimensions (`Method.param_shapes`), so a spec's cost on a model is known from `targeting.plan`
alone. `check_fits` refuses a plan whose parameters exceed the memory the target device has free
(a rank or width of 10**9 fails here, at inject time, with the site's dimensions in the message,
instead of in the allocator).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from .errors import SpecError
from .registry import METHODS

if TYPE_CHECKING:
    from .targeting import PlannedSite


def site_shapes(site: "PlannedSite", local: bool = False) -> dict[str, tuple[int, ...]]:
    """Every parameter the site's adapter would have, under its key in the model (`state_prefix`), or
    with `local` under its key within its set, as an adapter file stores it (`<site>.<entry>.<param>`)."""
    method = METHODS[site.entry.method]
    shapes = method.param_shapes(site.entry.config, in_dim=site.in_dim, out_dim=site.out_dim,
                                 branch=site.attachment.branch, **site.extra)
    prefix = site.attachment.local_prefix if local else site.attachment.state_prefix
    return {f"{prefix}.{name}": tuple(shape) for name, shape in shapes.items()}


def planned_shapes(planned: Iterable["PlannedSite"], local: bool = False) -> dict[str, tuple[int, ...]]:
    """`site_shapes` of every planned site, in plan order."""
    out: dict[str, tuple[int, ...]] = {}
    for site in planned:
        out.update(site_shapes(site, local))
    return out


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def human(nbytes: int) -> str:
    """`1.5 GB`-style size (powers of 1024)."""
    size = float(nbytes)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if size < 1024 or unit == "PB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (CPU: MemAvailable), or None when unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(planned: list["PlannedSite"], device: torch.device) -> None:
    """SpecError when the planned adapters' parameters exceed the free memory of `device`.

    Adapters are built on the CPU in the default dtype and then moved, so the CPU must also hold
    the largest single site. The message names the entry with the most parameters, one of its
    sites with that site's dimensions, and both sizes.
    """
    itemsize = torch.empty((), dtype=torch.get_default_dtype(), device="meta").element_size()
    per_entry: dict[str, int] = {}
    largest: dict[str, tuple[int, "PlannedSite"]] = {}
    for site in planned:
        n = sum(numel(s) for s in site_shapes(site).values())
        per_entry[site.entry.name] = per_entry.get(site.entry.name, 0) + n
        if n > largest.get(site.entry.name, (-1, None))[0]:
            largest[site.entry.name] = (n, site)
    total = sum(per_entry.values()) * itemsize
    worst_site = max((n for n, _ in largest.values()), default=0) * itemsize
    budgets = [(device, total)]
    if device.type != "cpu":
        budgets.append((torch.device("cpu"), worst_site))
    for where, need in budgets:
        free = available_bytes(where)
        if free is None or need <= free:
            continue
        name = max(per_entry, key=per_entry.get)
        n, site = largest[name]
        raise SpecError(
            f"the spec cannot fit: its adapters need {human(need)} on {where}, which has {human(free)} free. "
            f"Entry {name!r} ({site.entry.method}, {site.entry.config}) has {per_entry[name]:,} parameters; "
            f"site {site.attachment.key!r} (in_dim {site.in_dim}, out_dim {site.out_dim}) alone needs {n:,} "
            f"({human(n * itemsize)} in {torch.get_default_dtype()}). Lower its sizes")
