"""Adapter-only checkpoints in safetensors: only adapter tensors; spec, backbone and version in metadata.

Keys are `<site key>.<entry>.<param>`, e.g. `vision_model.encoder.layers.0.self_attn.k_proj.lora.lora_a`.
A file may come from anyone, so loading checks, in this order and before it builds or copies
anything: the file and its header (format, version), the stored spec and backbone, every key, shape
and dtype in the header against the shapes the stored spec implies for this model (computed by
`targeting.plan` and `Method.param_shapes`, nothing built, no tensor data read), then the tensor
data (finite, unless `allow_non_finite`). Only then does it inject the stored spec (into a model
with no adapters) and copy. No pickle is ever read. See docs/checkpoints.md.
Saving writes a temporary file beside the target and renames it over the target, so a crash mid-save
leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .api import adapter_parameters, eject, get_injection, inject
from .atomic import write_atomic
from .backbones.discover import discover
from .errors import CheckpointError, InputError, SpecError
from .sets import DEFAULT, check_set_name
from .sizes import human, numel, planned_shapes
from .spec import Spec
from .targeting import plan

FORMAT_NAME = "petl_tpr.adapters"
FORMAT_VERSION = 1


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor, detached, under its checkpoint key."""
    return {k: p.detach() for k, p in adapter_parameters(model).items()}


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; save_adapters writes one file: give a file path such as "
                              f"{path / 'adapters.safetensors'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"cannot save to {path}: {parent} is a file, not a directory")
            break


SET_SEPARATOR = "::"      # `<set>::<key>` in a file that holds several sets
RESERVED = {"format", "format_version", "spec", "backbone", "merged_entries", "set", "sets", "active"}


def _sets_to_save(injection, name: str | None) -> list[str]:
    names = list(injection.sets) if name is None else [name]
    if name is not None and name not in injection.sets:
        raise CheckpointError(f"no adapter set named {name!r} to save; sets: {', '.join(injection.sets)}")
    merged = [n for n in names if injection.sets[n].spec is None]
    if merged:
        entries = ", ".join(e for n in merged for e in injection.sets[n].merged_entries)
        what = "every adapter" if len(names) == 1 else f"set(s) {', '.join(map(repr, merged))}: every adapter"
        raise CheckpointError(f"{what} ({entries}) was merged into the base weights; there is nothing adapter-only "
                              f"left to save" + ("" if len(names) == 1 else "; save the other sets by name"))
    return names


def save_adapters(model: nn.Module, path: str | os.PathLike, *, name: str | None = None,
                  extra: dict[str, str] | None = None) -> Path:
    """Write the adapters of `model` to `path` atomically; returns the path.

    With `name`, set `name` alone (keys `<site>.<entry>.<param>`, loadable under any set name);
    without, every set, each under its name (one set: as with `name`; several: keys `<set>::<key>`).
    """
    path = Path(path)
    _check_target(path)
    injection = get_injection(model)
    if injection is None:
        raise CheckpointError("this model has no adapters to save (call inject first)")
    names = _sets_to_save(injection, name)
    if extra and RESERVED & set(extra):
        raise CheckpointError(f"extra metadata may not use the reserved key(s) {sorted(RESERVED & set(extra))}")
    if extra and not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise CheckpointError("extra metadata must map strings to strings (safetensors stores strings only)")
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "backbone": json.dumps(injection.fingerprint, sort_keys=True)}
    tensors: dict[str, torch.Tensor] = {}
    if len(names) == 1:
        adapter_set = injection.sets[names[0]]
        metadata |= {"spec": adapter_set.spec.to_json(), "merged_entries": json.dumps(adapter_set.merged_entries),
                     "set": names[0]}
        tensors = dict(adapter_parameters(model, names[0]))
    else:
        metadata["sets"] = json.dumps([{"name": n, "spec": injection.sets[n].spec.to_dict(),
                                        "merged_entries": injection.sets[n].merged_entries} for n in names])
        metadata["active"] = json.dumps(list(injection.gate.active))
        for n in names:
            tensors |= {f"{n}{SET_SEPARATOR}{k}": v for k, v in adapter_parameters(model, n).items()}
    metadata |= extra or {}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    try:
        return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    except OSError as error:   # the previous file, if any, is left as it was
        raise CheckpointError(f"could not write {path}: {error}") from error


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_UNREADABLE = (SafetensorError, ValueError, OSError, UnicodeDecodeError)


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file (truncated or another format): {error}")


@dataclass(frozen=True)
class Header:
    """What an adapter file's header says, read without touching its tensor data."""

    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]      # safetensors dtype names: "F32", "BF16", ...


def _open(path: Path):
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not an adapter file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return safe_open(str(path), framework="pt")
    except _UNREADABLE as error:
        raise _unreadable(path, error) from None


def read_header(path: str | os.PathLike) -> Header:
    """Metadata, shapes and dtypes of an adapter file, with format and version checked; no tensor data is read.

    safetensors checks on opening that the header's offsets and sizes match the file's length.
    """
    path = Path(path)
    try:
        with _open(path) as handle:
            metadata = handle.metadata() or {}
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
            dtypes = {key: s.get_dtype() for key, s in slices.items()}
    except _UNREADABLE as error:
        raise _unreadable(path, error) from None
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is a safetensors file but not a petl_tpr adapter file "
                              f"(metadata format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path} has adapter format version {version!r}; this petl_tpr reads version {FORMAT_VERSION}")
    return Header(metadata, shapes, dtypes)


def _read_tensors(path: Path, keys) -> dict[str, torch.Tensor]:
    try:
        with _open(path) as handle:
            return {key: handle.get_tensor(key) for key in keys}
    except (*_UNREADABLE, RuntimeError) as error:
        raise CheckpointError(f"{path}: could not read the tensor data: {error}") from None


def read_adapters(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file, with format and version checked."""
    header = read_header(path)
    return _read_tensors(Path(path), sorted(header.shapes)), header.metadata


def _check_backbone(model: nn.Module, stored: dict, path: Path) -> None:
    actual = discover(model).fingerprint()
    if not isinstance(stored, dict) or not all(isinstance(v, dict) for v in stored.values()):
        raise CheckpointError(f"{path}: backbone metadata must map branch names to objects, got {str(stored)[:80]}")
    for name, info in stored.items():
        if name not in actual:
            raise CheckpointError(f"{path} was saved on a backbone with branch {name!r} ({info}); this model has "
                                  f"{json.dumps(actual)}")
        if actual[name] != info:
            raise CheckpointError(f"{path}: branch {name!r} was {info} when saved but is {actual[name]} in this model")


def _check_shapes(file: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], path: Path,
                  source: str) -> None:
    """Keys in both directions, then shapes; `source` says where `expected` comes from."""
    for key in file:
        if key not in expected:
            raise CheckpointError(f"{path}: tensor {key!r} has no matching adapter parameter in the model")
    for key, shape in expected.items():
        if key not in file:
            raise CheckpointError(f"{path}: adapter parameter {key!r} {shape} is missing from the file")
    for key, shape in expected.items():
        if file[key] != shape:
            want, have = sum(numel(s) for s in expected.values()), sum(numel(s) for s in file.values())
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {file[key]} in the file but {shape} {source} "
                f"({numel(file[key]):,} vs {numel(shape):,} elements; in all, the file holds {have:,} and "
                f"the model would need {want:,}, {human(4 * want)} in float32)")


def _check_dtypes(dtypes: dict[str, str], path: Path) -> None:
    for key in sorted(dtypes):
        if dtypes[key] not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {dtypes[key]}; adapter tensors are floating "
                                  f"point ({', '.join(FLOAT_DTYPES)})")


def _check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    for key in sorted(tensors):
        bad = ~torch.isfinite(tensors[key])
        if bool(bad.any()):
            nan = int(torch.isnan(tensors[key]).sum())
            raise CheckpointError(f"{path}: tensor {key!r} holds {int(bad.sum())} non-finite value(s) ({nan} NaN, "
                                  f"the rest inf); the run it comes from diverged. Pass allow_non_finite=True to "
                                  f"load it anyway (for debugging)")


@dataclass(frozen=True)
class StoredSet:
    """One adapter set as a file stores it: its name, spec, and the prefix of its keys in the file."""

    name: str
    spec: Spec
    key_prefix: str


def _stored(metadata: dict[str, str], path: Path) -> tuple[list[StoredSet], dict, list[str] | None]:
    """The file's sets, its backbone fingerprint and (several sets) the sets that were active."""
    try:
        backbone = json.loads(metadata["backbone"])
        if "sets" not in metadata:
            name = metadata.get("set", DEFAULT)
            return [StoredSet(check_set_name(name), Spec.from_json(metadata["spec"]), "")], backbone, None
        raw = json.loads(metadata["sets"])
        if not isinstance(raw, list) or not raw or not all(isinstance(e, dict) for e in raw):
            raise ValueError("'sets' must be a non-empty list of objects")
        sets = [StoredSet(check_set_name(e.get("name")), Spec.from_dict(e.get("spec")),
                          f"{e.get('name')}{SET_SEPARATOR}") for e in raw]
        if len({s.name for s in sets}) != len(sets):
            raise ValueError("a set name repeats")
        active = json.loads(metadata.get("active", "[]"))
        if not isinstance(active, list) or not all(isinstance(a, str) for a in active):
            raise ValueError("'active' must be a list of set names")
    except (KeyError, SpecError, InputError, ValueError, RecursionError, TypeError) as error:
        raise CheckpointError(f"{path}: unreadable spec, set or backbone metadata: {error}") from None
    return sets, backbone, [a for a in active if a in {s.name for s in sets}]


def _split_keys(shapes: dict[str, tuple[int, ...]], sets: list[StoredSet], path: Path) -> list[dict[str, tuple[int, ...]]]:
    """The file's keys per set, with each set's key prefix taken off."""
    out: list[dict[str, tuple[int, ...]]] = [{} for _ in sets]
    for key, shape in shapes.items():
        owner = next((i for i, s in enumerate(sets) if key.startswith(s.key_prefix)), None)
        if owner is None:
            raise CheckpointError(f"{path}: tensor {key!r} belongs to none of the file's sets "
                                  f"({', '.join(s.name for s in sets)})")
        out[owner][key[len(sets[owner].key_prefix):]] = shape
    return out


def load_adapters(model: nn.Module, path: str | os.PathLike, *, name: str | None = None,
                  overwrite: bool = False, allow_non_finite: bool = False) -> nn.Module:
    """Load an adapter file into `model`: each set it holds is injected from its stored spec and filled.

    `name` loads a one-set file under that set name (default: the name it was saved under,
    "default" for files that never named one). A set name the model already has is an error, except
    the default set when `name` is not given: a default-set file is then copied into the model's
    default set, which it must fit (loading weights into a model injected by hand, as before sets).
    `overwrite` fills every set the model already has from the file instead (resuming a run).
    Everything is checked before anything is built or copied (docs/checkpoints.md); a refused file
    leaves the model as it was. `allow_non_finite` lets NaN/inf tensors through (a diverged run).
    """
    path = Path(path)
    header = read_header(path)
    sets, stored_backbone, active = _stored(header.metadata, path)
    if name is not None:
        check_set_name(name)
        if len(sets) > 1:
            raise CheckpointError(f"{path} holds {len(sets)} adapter sets ({', '.join(s.name for s in sets)}), each "
                                  f"under its name; load it without name=")
        sets = [StoredSet(name, sets[0].spec, sets[0].key_prefix)]
    _check_backbone(model, stored_backbone, path)
    injection = get_injection(model)
    existing = dict(injection.sets) if injection is not None else {}
    legacy = name is None and len(sets) == 1 and sets[0].name == DEFAULT   # a default-set file, as before sets
    fill = [s.name in existing and (overwrite or legacy) for s in sets]    # copied into a set already there
    clash = [s.name for s, f in zip(sets, fill) if s.name in existing and not f]
    if clash:
        raise CheckpointError(f"{path}: the model already has adapter set(s) {', '.join(map(repr, clash))}; eject "
                              f"them first, load a one-set file under another name (name=...), or pass "
                              f"overwrite=True to fill them from the file")
    per_set = _split_keys(header.shapes, sets, path)
    backbone = None
    attachments = list(injection.attachments) if injection is not None else []
    for stored, file_shapes, into in zip(sets, per_set, fill):
        if into:
            live_shapes = {k: tuple(p.shape) for k, p in adapter_parameters(model, stored.name).items()}
            _check_shapes(file_shapes, live_shapes, path, f"in the model's set {stored.name!r}")
            continue
        backbone = backbone or discover(model)
        try:   # the stored spec's sites and parameter shapes on this model: planned, not built
            planned = plan(model, stored.spec, backbone, attachments, fits=False, set_name=stored.name)
        except SpecError as error:
            raise CheckpointError(f"{path}: the stored spec of set {stored.name!r} does not apply to this model: "
                                  f"{error}") from None
        attachments += [site.attachment for site in planned]
        _check_shapes(file_shapes, planned_shapes(planned, local=True), path,
                      "as the stored spec implies for this model")
    _check_dtypes(header.dtypes, path)
    tensors = _read_tensors(path, sorted(header.shapes))   # now bounded by the expected sizes
    _check_shapes({k: tuple(v.shape) for k, v in tensors.items()}, header.shapes, path,
                  "in its header (the file changed while it was read)")
    if not allow_non_finite:
        _check_finite(tensors, path)
    done: list[str] = []
    try:
        for stored, into in zip(sets, fill):
            if not into:
                try:
                    inject(model, stored.spec, name=stored.name)
                except SpecError as error:
                    raise CheckpointError(f"{path}: the stored spec of set {stored.name!r} does not fit this model: "
                                          f"{error}") from None
                done.append(stored.name)
            live = adapter_parameters(model, stored.name)
            mine = {k[len(stored.key_prefix):]: v for k, v in tensors.items() if k.startswith(stored.key_prefix)}
            _check_shapes({k: tuple(v.shape) for k, v in mine.items()}, {k: tuple(p.shape) for k, p in live.items()},
                          path, "in the model")
            with torch.no_grad():
                for key, param in live.items():
                    param.copy_(mine[key].to(dtype=param.dtype, device=param.device))
    except BaseException:
        for set_name in reversed(done):
            eject(model, set_name)
        raise
    if active is not None:
        from .switch import activate

        activate(model, active)      # the file's active sets, as they were when it was saved
    return model
