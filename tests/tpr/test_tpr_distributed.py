"""Distributed data parallel training: `torchrun --nproc_per_node 2` (gloo, CPU) against one process.

The training set has 17 captions and the global batch is 8, so each epoch is 8 + 8 + 1 and rank
1's share of the last batch is empty (the uneven path). Training uses the test transform: with
augmentation the ranks draw from their own streams, which one process cannot reproduce.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from petl_tpr.compat import ensure_torchvision_importable

ensure_torchvision_importable()

import petl_tpr as pt  # noqa: E402
import petl_tpr.tpr as tpr  # noqa: E402
from petl_tpr.tpr.training.distributed import ProcessGroup, local_batch_size, shard  # noqa: E402
from petl_tpr.tpr.training.trainer import TrainConfig, train  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_tpr_train import SIZE, adapters, strip_times, tiny_model  # noqa: E402

SETTINGS = dict(epochs=2, batch_size=8, lr=5e-3, warmup_epochs=1, seed=1, id_loss=True, mask_captions=True,
                eval_split="test", plot=False)
# Whole-model training moves every weight a lot: a small lr keeps the float-rounding noise (which
# one process shows too between 1 and 2 threads: 1.4e-4 at lr 5e-3) well under the tolerance.
WHOLE = dict(trainable="all", epochs=1, warmup_epochs=0, eval_split="none", lr=5e-4)


def load_data(root) -> tpr.PersonRetrievalData:
    data = tpr.build_dataset("cuhk-pedes", root)
    return dataclasses.replace(data, train=data.train[:17])


def run(model, data, out_dir, **overrides):
    resume, stop_after = overrides.pop("resume", False), overrides.pop("stop_after", None)
    config = TrainConfig(out_dir=out_dir, **{**SETTINGS, **overrides})
    return train(model, data, config, tokenizer=tpr.ClipTokenizer(), train_transform=tpr.build_test_transform(SIZE),
                 eval_transform=tpr.build_test_transform(SIZE), resume=resume, stop_after=stop_after)


def disturbed(model):
    """Other adapter values, so that a resumed run must take everything from the checkpoint."""
    torch.manual_seed(1234)
    with torch.no_grad():
        for param in pt.adapter_state_dict(model.clip).values():
            param.normal_()
    return model


CHILD = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
import test_tpr_distributed as t
from petl_tpr.tpr import distributed

out, data = Path({out!r}), t.load_data({root!r})
straight = t.tiny_model()
result = {{"straight": t.run(straight, data, out / "a"), "adapters": t.adapters(straight)}}
t.run(t.tiny_model(), data, out / "b", stop_after=1)
resumed = t.disturbed(t.tiny_model())
result["resumed"] = t.run(resumed, data, out / "b", resume=True)
result["resumed_adapters"] = t.adapters(resumed)
whole = t.bare_model()
t.run(whole, data, out / "c", **t.WHOLE)
result["whole"] = {{k: v.clone() for k, v in whole.clip.state_dict().items()}}
rank = torch.distributed.get_rank()
torch.save(result, out / f"result_{{rank}}.pt")
distributed.cleanup()
"""


def bare_model():
    model = tiny_model()
    pt.eject(model.clip)
    return model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def max_difference(ours: dict, theirs: dict) -> float:
    assert list(ours) == list(theirs)
    return max(float((ours[k] - theirs[k]).abs().max()) for k in ours)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun launch (2 ranks): a straight run, a run stopped after epoch 1 and resumed, and a
    whole-model run; the results of every rank plus the run directories."""
    tmp = tmp_path_factory.mktemp("ddp")
    root = tpr.write_synthetic(tmp / "synth", identities=10, images_per_id=2, captions_per_image=2,
                               test_fraction=0.2, val_fraction=0.2, seed=3)
    script = tmp / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent), out=str(tmp), root=str(root)))
    # The children import this checkout's petl_tpr (not whichever one is installed).
    checkout = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(script)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    print(f"torchrun launch: {time.perf_counter() - began:.1f} s")
    results = [torch.load(tmp / f"result_{rank}.pt", weights_only=True) for rank in (0, 1)]
    return tmp, root, results


def test_both_ranks_return_the_same_history_and_weights(launched):
    _, _, (zero, one) = launched
    assert zero["straight"] == one["straight"] and zero["resumed"] == one["resumed"]
    assert max_difference(zero["adapters"], one["adapters"]) == 0.0
    assert [r["samples"] for r in zero["straight"]] == [17, 17] and [r["steps"] for r in zero["straight"]] == [3, 3]


def test_two_ranks_train_like_one_process_on_the_global_batch(launched, tmp_path):
    """Gather + gradient averaging: the same adapters, losses and metrics as one process, up to
    float rounding (the sums over a batch are split differently)."""
    _, root, (zero, _) = launched
    data = load_data(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # like the ranks (OMP_NUM_THREADS=1); several times faster here
    try:
        single, whole = tiny_model(), bare_model()
        history = run(single, data, tmp_path / "a")
        run(whole, data, tmp_path / "c", **WHOLE)
    finally:
        torch.set_num_threads(threads)
    difference = max_difference(adapters(single), zero["adapters"])
    moved = max_difference(adapters(single), adapters(tiny_model()))
    print(f"max |single - ddp| = {difference:.3g}; max |trained - initial| = {moved:.3g}")
    assert difference < 1e-5 and moved > 1e-2
    for ours, theirs in zip(strip_times(history), strip_times(zero["straight"])):
        assert ours.keys() == theirs.keys() and ours["samples"] == theirs["samples"]
        for key in ("loss", "sdm", "id", "lr"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
        assert ours["test"] == pytest.approx(theirs["test"], abs=1e-3)
    whole_difference = max_difference(whole.clip.state_dict(), zero["whole"])
    print(f"trainable='all': max |single - ddp| = {whole_difference:.3g}")
    assert whole_difference < 1e-5


def test_only_rank_zero_writes_and_resume_equals_straight(launched):
    tmp, _, (zero, _) = launched
    for run_dir, epochs in (("a", 2), ("b", 2), ("c", 1)):
        lines = [json.loads(line) for line in (tmp / run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in lines] == list(range(1, epochs + 1)), run_dir
    assert json.loads((tmp / "a" / "metrics.jsonl").read_text().splitlines()[-1]) == json.loads(
        json.dumps(zero["straight"][-1]))
    assert sorted(p.name for p in (tmp / "a").iterdir()) == ["best.safetensors", "checkpoints", "metrics.jsonl"]
    assert not [p for p in tmp.rglob("*.tmp*")]
    assert strip_times(zero["resumed"]) == strip_times(zero["straight"])
    assert max_difference(zero["resumed_adapters"], zero["adapters"]) == 0.0


# ------------------------------------------------------------------------ no processes launched


def test_the_global_batch_must_split_evenly():
    assert local_batch_size(128, 8) == 16 and local_batch_size(7, 1) == 7
    with pytest.raises(tpr.TaskInputError, match="divisible"):
        local_batch_size(10, 4)


def test_rank_shares_make_up_the_single_process_batches():
    """Same seed on every rank: the shares of step i, in rank order, are the single-process batch i."""
    assert [shard(5, r, 2) for r in (0, 1)] == [(0, 3), (3, 5)] and shard(1, 1, 2) == (1, 1)
    dataset = list(range(17))
    single = list(torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True,
                                              generator=torch.Generator().manual_seed(5)))
    shares = [list(ProcessGroup(rank=r, world_size=4).loader(
        dataset, batch_size=8, drop_last=False, generator=torch.Generator().manual_seed(5), num_workers=0,
        pin_memory=False)) for r in range(4)]
    assert [len(s) for s in shares] == [3] * 4
    for step, batch in enumerate(single):
        assert torch.cat([shares[r][step] for r in range(4) if shares[r][step] is not None]).tolist() == batch.tolist()
    assert [len(shares[0][-1])] + [shares[r][-1] for r in (1, 2, 3)] == [1, None, None, None]
