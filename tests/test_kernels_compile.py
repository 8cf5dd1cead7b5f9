"""The routed-adapter Triton kernels compiled ahead of time for sm_90 (H100/H200) on this CPU machine.

`compile_report` records the launches the real launcher makes at DM-Adapter's batch-128 shapes and
compiles them with ptxas for sm_90: these tests check what the GPU would run (no spills, shared memory
within the limit, Hopper tensor cores, 16-byte gathers, relaxed atomics) without a GPU.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="needs triton >= 3.2's compiler API")

from petl_tpr.kernels.triton import compile_report, interpreting, launch  # noqa: E402

pytestmark = pytest.mark.skipif(interpreting(), reason="TRITON_INTERPRET=1 replaces the JIT functions")
H100 = compile_report.ARCHS[90]


PICKED = [("routed_fwd_pairs_kernel", "pairs"), ("routed_bwd_token_pairs_kernel", "pairs"),
          ("routed_bwd_weight_kernel", "")]                                       # E = 6, k = 2: pair tiles
SLOT_FORWARD = [("routed_fwd_kernel", "first"), ("routed_fwd_kernel", "last"), ("routed_bwd_token_kernel", "first"),
                ("routed_bwd_token_kernel", "last")]                              # k = 2 slot passes


def _kernels(shape, dtype, activation="relu"):
    """What the launcher picks at the shape, then the slot-pass kernels forced."""
    return (compile_report.kernel_stats(shape, dtype, activation, arch=90)
            + compile_report.kernel_stats(shape, dtype, activation, arch=90, kernels=("fwd", "bwd_token"),
                                          forward="slots"))


def _check_hopper_ready(rows, dtype):
    assert [(row.kernel, row.variant) for row in rows] == PICKED + SLOT_FORWARD
    for row in rows:
        where = f"{row.kernel} {row.variant} {row.shape} {row.dtype}"
        assert row.spill_bytes == 0 and row.stack_bytes == 0, f"{where} spills: {row}"
        assert 0 < row.shared_bytes <= H100.shared_per_block, where
        assert row.blocks_per_sm >= 1 and row.waves > 0, where
        if row.kernel == "routed_bwd_weight_kernel":   # row shares combine atomically, relaxed
            assert row.atomics and all(".relaxed." in name for name in row.atomics), f"{where}: {row.atomics}"
        else:                                          # slot passes own their rows: plain loads and stores
            assert not row.atomics, f"{where}: {row.atomics}"
        if dtype != "float32":
            operands = {"float16": ".f16.f16", "bfloat16": ".bf16.bf16"}[dtype]
            assert row.tensor_core and all(name.startswith("wgmma.mma_async") and name.endswith(operands)
                                           for name in row.tensor_core), f"{where}: {row.tensor_core}"
            assert int(row.loads_by_bytes.get("16", 0)) > 0, f"{where}: no 16-byte loads {row.loads_by_bytes}"


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_vision_kernels_compile_for_sm90_without_spills_on_tensor_cores(dtype):
    _check_hopper_ready(_kernels("vision", dtype), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("shape", ["vision", "text"])
def test_every_shape_dtype_activation_compiles_for_sm90(shape, dtype, activation):
    _check_hopper_ready(_kernels(shape, dtype, activation), dtype)


def test_fp32_follows_torch_tf32_flag():
    """fp32 dots are exact FMA dots unless torch allows TF32 for matmuls, then TF32 wgmma (as cuBLAS).
    The flag is set and restored by hand: cuBLASModule's attributes are properties that pytest's
    monkeypatch cannot undo (it tries to delete them)."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        ieee, _ = compile_report.kernel_stats("text", "float32", arch=90, kernels=("fwd",), forward="slots")
        matmul.allow_tf32 = True
        tf32, _ = compile_report.kernel_stats("text", "float32", arch=90, kernels=("fwd",), forward="slots")
    finally:
        matmul.allow_tf32 = saved
    assert ieee.tensor_core == {} and ieee.spill_bytes == 0
    assert tf32.tensor_core and all(".tf32.tf32" in name for name in tf32.tensor_core), tf32.tensor_core


def test_tile_table_kernel_compiles_for_sm90():
    rows = compile_report.kernel_stats("vision", "bfloat16", arch=90, kernels=("plan",))
    assert [row.kernel for row in rows] == ["routed_tiles_kernel"] * 2          # before the forward, the backward
    assert [row.grid for row in rows] == [[1], [1]]                           # the pair plans (one program)
    assert all(row.spill_bytes == 0 and not row.atomics for row in rows), rows


def test_recorded_launches_are_the_launchers():
    """Grids and constants recorded on the CPU are those of launch.py's plan at that shape."""
    T, d, r, E, k = 500, 96, 20, 5, 3
    launches = [rec for rec in compile_report.record_launches(T, d, r, E, k, torch.bfloat16, "gelu", sms=132)
                if rec.kernel is not launch.routed_tiles_kernel]
    *passes, weight = launches
    cfg = launch.blocks("fwd", d, r, torch.bfloat16)
    n = T * k
    kernels = [launch.routed_fwd_kernel] * k + [launch.routed_bwd_token_kernel] * k
    assert [rec.kernel for rec in passes] == kernels
    assert [compile_report.pass_name(rec.meta) for rec in passes] == ["first", "middle", "last"] * 2
    assert all(rec.grid == (triton.cdiv(T, cfg.BM) + E,) for rec in passes)    # one pass per slot: T rows
    fwd = passes[0]
    weight_cfg = launch.blocks("bwd_weight", d, r, torch.bfloat16)
    split = launch._weight_split(n, E, triton.cdiv(d, weight_cfg.BD), weight_cfg.BM, 132)
    assert weight.kernel is launch.routed_bwd_weight_kernel and weight.grid == (E, triton.cdiv(d, weight_cfg.BD), 2 * split)
    assert fwd.meta["ACT"] == 1 and fwd.meta["BR"] == 32 and fwd.meta["DOT"] == triton.language.bfloat16
    assert weight.meta["SPLIT"] == split and split > 1     # spread over the SMs


def test_overrides_reach_the_compiled_kernel():
    small, _ = compile_report.kernel_stats("text", "bfloat16", arch=90, kernels=("fwd",), forward="slots",
                                           overrides={"fwd": {"BM": 32, "BD": 32, "num_warps": 8}})
    assert small.num_warps == 8 and small.constants["BM"] == "32" and small.constants["BD"] == "32"
    assert small.grid == [triton.cdiv(128 * 77, 32) + 6]


def test_block_overrides_are_checked_and_restored():
    before = launch.blocks("fwd", 768, 96)
    with pytest.raises(ValueError, match="unknown kernels"):
        with launch.block_overrides(forward={"BM": 32}):
            pass
    with pytest.raises(ValueError, match="fields"):
        with launch.block_overrides(fwd={"BN": 32}):
            pass
    with launch.block_overrides(fwd={"BR": 64}):
        with pytest.raises(ValueError, match="BR >= r"):
            launch.blocks("fwd", 768, 96)
    with pytest.raises(RuntimeError):
        with launch.block_overrides(bwd_token={"BM": 128}):
            assert launch.blocks("bwd_token", 768, 96).BM == 128
            raise RuntimeError
    assert launch.blocks("fwd", 768, 96) == before and launch.blocks("bwd_token", 768, 96).BM == before.BM


def test_ptx_counts_reads_widths_and_instructions():
    ptx = "\n".join([
        "cp.async.cg.shared.global [ %r116 + 0 ], [ %rd92 + 0 ], 0x10, %r117;",
        "@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
        "ld.global.nc.b16 {%h1}, [%rd2];",
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};",
        "@%p2 red.global.gpu.relaxed.add.v4.f32 [ %rd3 + 0 ], { %f1, %f2, %f3, %f4 };",
        "atom.global.gpu.acq_rel.add.f32 %f5, [ %rd4 + 0 ], %f6;",
    ])
    tensor, loads, atomics = compile_report.ptx_counts(ptx)
    assert tensor == {"wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16": 1}
    assert loads == {"2": 1, "16": 2}
    assert atomics == {"red.global.gpu.relaxed.add.v4.f32": 1, "atom.global.gpu.acq_rel.add.f32": 1}


def test_occupancy_limits():
    # 255 registers x 32 threads round up to 8192 per warp: 65536 / (8192 x 4 warps) = 2 blocks
    assert compile_report.occupancy(H100, 255, 16 * 1024, 4) == (2, "registers")
    # 100 KB (+1 KB reserved) of the SM's 228 KB: 2 blocks
    assert compile_report.occupancy(H100, 32, 100 * 1024, 4) == (2, "shared")
    assert compile_report.occupancy(H100, 24, 1024, 8) == (8, "warps")   # 64 warps per SM / 8


def test_static_block_sweep_writes_json_and_plot(tmp_path):
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import moa_block_sweep

    result = moa_block_sweep.main(["--static", "--quick", "--shapes", "text", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "moa_block_sweep_static_sm90.json").read_text())["rows"]
    assert rows == result["rows"] and len(rows) == len(launch.KERNELS) * len(moa_block_sweep.QUICK)
    assert all(row["fits"] and row["registers"] > 0 for row in rows)   # the quick candidates do not spill
    assert (tmp_path / "moa_block_sweep_static_sm90.png").stat().st_size > 0


# ---- device work per call: what the launcher issues besides the kernels -------------------------------------

ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided"}   # no kernel: the caching allocator
VIEWS = {"view", "_unsafe_view", "reshape", "expand", "select", "slice", "alias", "t", "transpose", "unsqueeze",
         "squeeze", "detach", "as_strided", "split", "unbind", "permute", "split_with_sizes"}


def _device_work(dtype: torch.dtype, check_ids: bool = True, forward: str = "auto") -> tuple[Counter, Counter, list, list]:
    """ATen ops (bar views and allocations) and Triton launches of one forward and one backward of the
    launcher at a small shape, on CPU tensors with the kernel launches recorded, not run."""
    from unittest import mock

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in VIEWS | ALLOCATIONS:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    x, ids, gates, w_down, b_down, w_up, b_up = compile_report.make_inputs(300, 64, 16, 6, 2, dtype)
    dy = torch.ones_like(x)
    launches = {"fwd": [], "bwd": []}
    counts = {}
    for phase in ("fwd", "bwd"):
        record = lambda kernel, grid, *a, phase=phase, **m: launches[phase].append(kernel.fn.__name__)  # noqa: E731
        with mock.patch.object(launch, "_launch", record), launch.forward_override(forward), Count() as counter:
            if phase == "fwd":
                _, h, order, bounds = launch.moa_routed_fwd._init_fn(x, ids, gates, w_down, b_down, w_up, b_up,
                                                                     "relu", True, check_ids)
            else:
                launch.moa_routed_bwd._init_fn(dy, x, ids, gates, w_down, w_up, b_up, h, order,
                                               bounds, "relu")
        counts[phase] = counter.ops
    return counts["fwd"], counts["bwd"], launches["fwd"], launches["bwd"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_launcher_issues_few_small_ops(dtype):
    """Each small op is a kernel launch on a GPU (~5 us of CPU time), which at batch-128 shapes costs as
    much as the fused kernels themselves: the plan is one sort, one searchsorted and one Triton kernel
    for the tile tables; the gates and token ids are read through `order` inside the kernels."""
    fwd_ops, bwd_ops, fwd_launches, bwd_launches = _device_work(dtype)
    assert fwd_launches == ["routed_tiles_kernel", "routed_fwd_kernel", "routed_fwd_kernel"]
    assert bwd_launches == ["routed_tiles_kernel", "routed_bwd_token_kernel", "routed_bwd_token_kernel",
                            "routed_bwd_weight_kernel"]
    unchecked, _, _, _ = _device_work(dtype, check_ids=False)        # the MoA layer's call: top-k ids
    assert unchecked == fwd_ops - Counter(aminmax=1, stack=1), unchecked   # no id check, no host transfer
    pair_ops, pair_bwd, pair_launches, pair_bwd_launches = _device_work(dtype, forward="pairs")
    assert pair_launches == ["routed_tiles_kernel", "routed_fwd_pairs_kernel"]
    assert pair_bwd_launches == ["routed_tiles_kernel", "routed_bwd_token_pairs_kernel", "routed_bwd_weight_kernel"]
    # + the pair plan (sort per token, keys, sort, searchsorted, gates in id order) next to the slot plan
    assert sum(pair_ops.values()) <= sum(fwd_ops.values()) + 7, pair_ops
    assert sum(pair_bwd.values()) <= sum(bwd_ops.values()) + 7, pair_bwd
    assert fwd_ops["sort"] == 1 and fwd_ops["searchsorted"] == 1
    assert sum(fwd_ops.values()) <= 7, fwd_ops          # aminmax, stack (+ the id check's copy), arange x2, add, ...
    casts = 5 if dtype == torch.bfloat16 else 0            # fp32 weight-gradient buffers back to the weights' dtype
    assert sum(bwd_ops.values()) <= 4 + casts, bwd_ops     # the four zeroed weight-gradient buffers
