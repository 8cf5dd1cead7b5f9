"""Compile the routed-adapter kernels ahead of time for a GPU architecture, on a machine with no GPU,
and report what the compiler made of them.

How: the real launchers (`launch.moa_routed_fwd`, `launch.moa_routed_bwd`) run on CPU tensors of
the requested shape with `launch._launch` swapped for a recorder, so the kernels, grids and
compile-time constants are exactly those a CUDA run at that shape would use (the SM count, which
sets the weight kernel's row split, is a parameter). Each recorded launch is then compiled by
`triton.compile` for `GPUTarget("cuda", arch, 32)` with the specialisation the JIT would apply to
the same arguments (16-divisibility of pointers and integers, integer 1 as a constant). ptxas comes
with the triton wheel.

What it reports per kernel (`KernelStats`): registers per thread, spilled (local) bytes, shared
memory, warps, the resident blocks per SM those allow (occupancy), the waves of the grid on the
device, and counts in the PTX of tensor-core instructions, global loads by width and atomics.
PTX counts are static (instructions in the unrolled code), not executed instructions.

Needs triton >= 3.2 (the `triton.backends` compiler API), imported without TRITON_INTERPRET.
Command line: `python -m petl_tpr.kernels.triton.compile_report --arch 90 [--json PATH]`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

import torch
import triton

from . import launch

# DM-Adapter at batch 128 (issue 5): vision T = 128 x 193, d = 768, r = 96; text T = 128 x 77,
# d = 512, r = 64; E = 6, k = 2.
SHAPES = {"vision": dict(T=128 * 193, d=768, r=96, E=6, k=2), "text": dict(T=128 * 77, d=512, r=64, E=6, k=2)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of a compute capability (CUDA programming guide, compute capabilities table)."""

    registers: int          # 32-bit registers per SM
    shared: int             # shared memory per SM, bytes
    shared_per_block: int   # most dynamic shared memory one block may use, bytes
    warps: int              # resident warps per SM
    blocks: int             # resident blocks per SM
    sms: int                # SMs of the reference part (for waves)
    part: str


ARCHS = {
    80: Arch(65536, 167936, 166912, 64, 32, 108, "A100"),
    90: Arch(65536, 233472, 232448, 64, 32, 132, "H100 SXM / H200"),
}
RESERVED_SHARED_PER_BLOCK = 1024    # the driver keeps 1 KB of shared memory per resident block (sm_80+)
REGISTER_UNIT = 256                 # registers are allocated per warp in units of 256


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its grid, positional args and keyword meta."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    meta: dict


@dataclass
class KernelStats:
    """What ptxas made of one kernel at one shape and dtype (see the module docstring)."""

    kernel: str
    variant: str                     # the slot pass of fwd / bwd_token ("first", "middle", "last", "only"); "" else
    shape: str
    dtype: str
    activation: str
    arch: int
    constants: dict
    grid: list[int]
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int                 # register spill stores per thread (ptxas -v); 0 is the aim
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int                # dynamic shared memory per block
    blocks_per_sm: int
    limited_by: str                  # registers, shared, warps or blocks
    occupancy: float                 # resident warps / the SM's maximum
    waves: float                     # grid blocks / (blocks_per_sm x SMs of the reference part)
    tensor_core: dict = field(default_factory=dict)     # instruction -> static count (wgmma / mma)
    loads_by_bytes: dict = field(default_factory=dict)  # bytes per global load (ld.global, cp.async) -> count
    atomics: dict = field(default_factory=dict)         # atom/red instruction -> count
    compile_s: float = 0.0


def make_inputs(T: int, d: int, r: int, E: int, k: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """CPU inputs of the routed op: x, expert_ids (k distinct per token), gates, w_down, b_down, w_up, b_up."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k].contiguous()
    floats = [torch.randn(T, d, generator=gen), torch.rand(T, k, generator=gen), torch.randn(E, d, r, generator=gen),
              torch.randn(E, r, generator=gen), torch.randn(E, r, d, generator=gen), torch.randn(E, d, generator=gen)]
    x, gates, *weights = [t.to(dtype) for t in floats]
    return [x, ids, gates, *weights]


def record_launches(T: int, d: int, r: int, E: int, k: int, dtype: torch.dtype, activation: str = "relu",
                    sms: int = 132, overrides: dict | None = None, forward: str = "auto") -> list[Launch]:
    """The forward (k slot passes), token-backward (k slot passes) and weight-backward launches a CUDA
    device with `sms` SMs would make (with `launch.block_overrides(**overrides)` in force, if given,
    and the forward run as `forward`: auto, pairs or slots)."""
    if launch.interpreting():
        raise RuntimeError("compile_report needs triton imported without TRITON_INTERPRET (the interpreter "
                           "replaces the JIT functions and uses interpreter block sizes)")
    recorded: list[Launch] = []

    def record(kernel, grid, *args, **meta):
        recorded.append(Launch(kernel, tuple(grid), args, meta))

    x, ids, gates, w_down, b_down, w_up, b_up = make_inputs(T, d, r, E, k, dtype)
    with mock.patch.object(launch, "_launch", record), mock.patch.object(launch, "_sm_count", lambda device: sms), \
            launch.block_overrides(**(overrides or {})), launch.forward_override(forward):
        _, h, order, bounds = launch.moa_routed_fwd(x, ids, gates, w_down, b_down, w_up, b_up, activation, True)
        launch.moa_routed_bwd(torch.randn_like(x), x, ids, gates, w_down, w_up, b_up, h, order, bounds, activation)
    return recorded


def _specialise(rec: Launch):
    """(signature, constexprs, attrs, options) as the JIT would build them for this launch."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    kernel = rec.kernel
    options = {key: rec.meta[key] for key in ("num_warps", "num_stages") if key in rec.meta}
    values = dict(zip(kernel.arg_names, rec.args))
    values.update({key: value for key, value in rec.meta.items() if key not in options})
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif spec:
            attrs[(index,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs, options


def _ptxas(arch: int) -> str:
    """The ptxas triton itself uses for `sm_<arch>` (the one bundled with the wheel)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except (ImportError, AttributeError):   # older triton: one bundled ptxas
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """registers, stack frame, spill store and spill load bytes per thread of the PTX's one kernel, as
    `ptxas -v` reports them for the PTX's own `.target`."""
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    gpu = target.group(1) if target else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([_ptxas(arch), "-v", "--gpu-name", gpu, str(source), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas failed: {done.stderr[-2000:]}")
    return parse_ptxas_info(done.stderr)


def parse_ptxas_info(text: str) -> dict[str, int]:
    """registers / stack / spill_stores / spill_loads from `ptxas -v` output."""
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    used = re.search(r"Used (\d+) registers", text)
    if not (frame and used):
        raise RuntimeError(f"unexpected ptxas -v output: {text[-1000:]}")
    stack, stores, loads = (int(v) for v in frame.groups())
    return {"registers": int(used.group(1)), "stack": stack, "spill_stores": stores, "spill_loads": loads}


_LOAD_BYTES = {"b8": 1, "u8": 1, "b16": 2, "u16": 2, "f16": 2, "b32": 4, "u32": 4, "f32": 4, "b64": 8, "u64": 8}


def ptx_counts(ptx: str) -> tuple[dict, dict, dict]:
    """Static counts in PTX text: tensor-core instructions, global loads by bytes, atomics."""
    tensor = Counter(re.findall(r"\b((?:wgmma\.mma_async|mma\.sync)\.[\w.]+)", ptx))
    loads: Counter = Counter()
    for vec, kind in re.findall(r"\bld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.([bfu]\d+)\b", ptx):
        loads[_LOAD_BYTES.get(kind, 0) * int(vec or 1)] += 1
    for size in re.findall(r"\bcp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-fA-F]+|\d+)", ptx):
        loads[int(size, 0)] += 1
    atomics = Counter(re.findall(r"\b((?:atom|red)\.global\.[\w.]+)", ptx))
    return dict(tensor), {str(k): v for k, v in sorted(loads.items())}, dict(atomics)


def pass_name(meta: dict) -> str:
    """Which slot pass a launch is, from its FIRST/LAST flags ("" for the weight kernel and the
    pair-tile forward)."""
    if "FIRST" not in meta:
        return ""
    return {(True, True): "only", (True, False): "first", (False, True): "last"}.get(
        (bool(meta["FIRST"]), bool(meta["LAST"])), "middle")


def occupancy(arch: Arch, registers: int, shared: int, warps: int) -> tuple[int, str]:
    """Resident blocks per SM and what limits them."""
    per_warp = math.ceil(registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
    limits = {"registers": arch.registers // max(1, per_warp * warps),
              "shared": arch.shared // (shared + RESERVED_SHARED_PER_BLOCK),
              "warps": arch.warps // warps, "blocks": arch.blocks}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def compile_launch(rec: Launch, arch: int = 90) -> tuple[object, float]:
    """triton.compile of one recorded launch for `sm_<arch>`; (CompiledKernel, seconds)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = _specialise(rec)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(rec.kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32), options=options or None)
    return compiled, time.perf_counter() - start


def kernel_stats(shape: str, dtype: str, activation: str = "relu", arch: int = 90, overrides: dict | None = None,
                 kernels: tuple[str, ...] = launch.KERNELS, forward: str = "auto") -> list[KernelStats]:
    """Compile the kernels (names from `launch.KERNELS`, or "plan" for the tile-table kernel, launched
    once before the forward and once before the token backward) as launched at `SHAPES[shape]` in
    `dtype`, with `overrides` for `launch.block_overrides`; one KernelStats each."""
    limits = ARCHS[arch]
    rows = []
    recorded = record_launches(**SHAPES[shape], dtype=DTYPES[dtype], activation=activation, sms=limits.sms,
                               overrides=overrides, forward=forward)
    names = {launch.routed_fwd_kernel: "fwd", launch.routed_bwd_token_kernel: "bwd_token",
             launch.routed_bwd_weight_kernel: "bwd_weight", launch.routed_tiles_kernel: "plan",
             launch.routed_fwd_pairs_kernel: "fwd_pairs", launch.routed_bwd_token_pairs_kernel: "bwd_token_pairs"}
    for rec in recorded:
        if names[rec.kernel] not in kernels:
            continue
        compiled, seconds = compile_launch(rec, arch)
        res = ptxas_usage(compiled.asm["ptx"], arch)
        warps, stages = compiled.metadata.num_warps, compiled.metadata.num_stages
        shared = compiled.metadata.shared
        blocks, limiter = occupancy(limits, res["registers"], shared, warps)
        tensor, loads, atomics = ptx_counts(compiled.asm["ptx"])
        constants = {key: str(value) for key, value in rec.meta.items()}
        programs = math.prod(rec.grid)
        rows.append(KernelStats(
            kernel=rec.kernel.fn.__name__, variant=pass_name(rec.meta) or ("pairs" if names[rec.kernel].endswith("_pairs") else ""),
            shape=shape, dtype=dtype, activation=activation, arch=arch,
            constants=constants, grid=list(rec.grid), num_warps=warps, num_stages=stages, registers=res["registers"],
            spill_bytes=res["spill_stores"], spill_load_bytes=res["spill_loads"], stack_bytes=res["stack"],
            shared_bytes=shared, blocks_per_sm=blocks, limited_by=limiter, occupancy=round(blocks * warps / limits.warps, 4),
            waves=round(programs / max(1, blocks * limits.sms), 3), tensor_core=tensor, loads_by_bytes=loads,
            atomics=atomics, compile_s=round(seconds, 2)))
    return rows


def report(shapes=tuple(SHAPES), dtypes=tuple(DTYPES), activations=("relu",), arch: int = 90,
           progress=None) -> dict:
    """{"arch", "part", "triton", "kernels": [KernelStats as dicts]} over the given matrix: the kernels
    the launcher picks (`forward="auto"`), then the slot-pass kernels where auto picked pair tiles."""
    kernels = []
    for shape in shapes:
        for dtype in dtypes:
            for activation in activations:
                if progress:
                    progress(f"compiling {shape} {dtype} {activation} for sm_{arch}")
                rows = kernel_stats(shape, dtype, activation, arch)
                if any(row.variant == "pairs" for row in rows):
                    rows += kernel_stats(shape, dtype, activation, arch, kernels=("fwd", "bwd_token"), forward="slots")
                kernels += [asdict(row) for row in rows]
    return {"arch": arch, "part": ARCHS[arch].part, "triton": triton.__version__, "kernels": kernels}


def format_table(result: dict) -> str:
    """One line per kernel: registers, spills, shared KB, warps, occupancy, waves, tensor cores, 16-B loads."""
    lines = [f"sm_{result['arch']} ({result['part']}), triton {result['triton']}",
             f"{'kernel':26} {'pass':6} {'shape':6} {'dtype':8} {'act':4} {'regs':>4} {'spill':>5} {'smemKB':>6} {'warps':>5} "
             f"{'blk/SM':>6} {'occ':>5} {'waves':>6} {'tensor-core':>11} {'16B-loads':>9} atomics"]
    for row in result["kernels"]:
        tensor = sum(row["tensor_core"].values())
        wide = row["loads_by_bytes"].get("16", 0)
        atomics = ",".join(sorted(row["atomics"]))
        lines.append(f"{row['kernel']:26} {row['variant']:6} {row['shape']:6} {row['dtype']:8} {row['activation']:4} {row['registers']:4d} "
                     f"{row['spill_bytes']:5d} {row['shared_bytes'] / 1024:6.1f} {row['num_warps']:5d} "
                     f"{row['blocks_per_sm']:6d} {row['occupancy']:5.2f} {row['waves']:6.2f} {tensor:11d} "
                     f"{wide:9d} {atomics}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=sorted(ARCHS), default=90)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--activations", nargs="+", choices=["relu", "gelu"], default=["relu"])
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    result = report(args.shapes, args.dtypes, args.activations, args.arch, progress=print)
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
