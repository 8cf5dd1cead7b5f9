"""Every preset on every zoo architecture: each result is served, or refused with a clear error.

`classify(arch, preset)` returns `(status, detail)`:
- "served": inject succeeded; with nothing trained the outputs equal the bare model's (fp32
  tolerance, for methods that are identity at init); with perturbed adapters every adapter in each
  block that ran did run and the outputs changed; a backward pass gives every adapter tensor (in the
  blocks the run calls) a gradient and no base parameter one; saved and loaded into a fresh build
  the adapters give the same outputs, and merged (LoRA) too; eject gives the model back bit for bit.
- "refused": a PetlError at inject (detail: its message), the model untouched.
- "forward-error": a PetlError at the first forward (clear, but later than inject).
- "SILENT": anything else (a raw exception, an adapter that never ran, outputs unchanged by the
  adapters, a takeover that changed the outputs, a merge that changed them): the bug to prevent.
"""

from __future__ import annotations

import os
import tempfile

import torch

import petl_tpr as pt
from petl_tpr.api import adapter_module, get_injection
from petl_tpr.registry import METHODS
from petl_tpr.runcheck import pending_keys

import backbone_zoo
from conftest import perturb

PRESETS = ("lora", "adapter", "l-adapter", "prefix", "s-prefix", "dm-adapter", "unipt", "up-person")
IDENTITY_ATOL = 1e-5


def _hashes(model: torch.nn.Module) -> dict[str, int]:
    return {k: hash(v.detach().numpy().tobytes()) for k, v in model.state_dict().items()}


def _run(run, model):
    with torch.no_grad():
        return run(model)


def classify(arch: str, preset: str) -> tuple[str, str]:
    model, run = backbone_zoo.build(arch)
    bare = _run(run, model)
    before = _hashes(model)
    try:
        pt.inject(model, preset)
    except pt.PetlError as error:
        if _hashes(model) != before or get_injection(model) is not None:
            return "SILENT", f"refused, but the model was changed: {error}"
        return "refused", str(error).split(". ")[0]
    except Exception as error:   # noqa: BLE001  (a raw exception is what this guards against)
        return "SILENT", f"raw {type(error).__name__} at inject: {error}"
    spec = get_injection(model).spec
    try:
        fresh = _run(run, model)
        if all(METHODS[e.method].identity_at_init for e in spec.entries):
            gap = (fresh - bare).abs().max().item()
            if gap > IDENTITY_ATOL:
                return "SILENT", f"outputs changed by {gap:.2e} with untrained adapters (a takeover that differs)"
        perturb(model)
        calls: dict[str, int] = {}
        for att in get_injection(model).attachments:
            calls.setdefault(att.state_prefix, 0)
            adapter_module(model, att).register_forward_pre_hook(
                lambda m, a, key=att.state_prefix: calls.__setitem__(key, calls[key] + 1))
        out = _run(run, model)
    except pt.PetlError as error:
        return "forward-error", str(error).split(". ")[0]
    except Exception as error:   # noqa: BLE001
        return "SILENT", f"raw {type(error).__name__} at forward: {error}"
    unverified = pending_keys(model)
    never = [k for k, n in calls.items() if n == 0 and k not in unverified]
    if never:
        return "SILENT", f"adapters in blocks that ran never ran: {never[:3]}"
    if out.shape == bare.shape and torch.allclose(out, bare, atol=1e-6, rtol=0):
        return "SILENT", "perturbed adapters left the outputs unchanged"
    try:
        for check in (_gradients_only_on_adapters, _same_in_a_fresh_model):
            problem = check(arch, model, run, out, unverified)
            if problem:
                return "SILENT", problem
        pt.eject(model)
        if _hashes(model) != before or not torch.equal(_run(run, model), bare):
            return "SILENT", "eject did not give the model back bit for bit"
    except Exception as error:   # noqa: BLE001  (a served model must train, save, load, merge and eject)
        return "SILENT", f"raw {type(error).__name__} after the first forward: {error}"
    ran = len(calls) - len(unverified)
    return "served", f"{ran}/{len(calls)} adapters ran" + (f" ({len(unverified)} in blocks this run does not call)"
                                                          if unverified else "")


def _gradients_only_on_adapters(arch, model, run, out, unverified) -> str | None:
    """A training step's gradient reaches every adapter tensor in the blocks this run calls, and nothing else."""
    run(model).square().sum().backward()
    adapters = {id(p) for p in pt.api.adapter_parameters(model).values()}
    base = [n for n, p in model.named_parameters() if id(p) not in adapters and p.grad is not None]
    if base:
        return f"base parameters got gradients: {base[:3]}"
    missing = []
    for att in get_injection(model).attachments:
        if att.state_prefix not in unverified:
            missing += [f"{att.state_prefix}.{n}" for n, p in adapter_module(model, att).named_parameters()
                        if p.grad is None]
    if missing:
        return f"adapter tensors got no gradient: {missing[:3]}"
    model.zero_grad(set_to_none=True)
    return None


def _same_in_a_fresh_model(arch, model, run, out, unverified) -> str | None:
    """Saved and loaded into a fresh build of the model, the adapters give the same outputs; merged, too."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "adapters.safetensors")
        pt.save_adapters(model, path)
        fresh, _ = backbone_zoo.build(arch)
        pt.load_adapters(fresh, path)
    loaded = _run(run, fresh)
    if loaded.shape != out.shape or not torch.allclose(loaded, out, atol=1e-5, rtol=1e-5):
        return "saved and loaded into a fresh model, the adapters gave other outputs"
    if any(METHODS[e.method].mergeable for e in get_injection(fresh).spec.entries):
        pt.merge(fresh)
        gap = (_run(run, fresh) - out).abs().max().item()
        if gap > 1e-4 * max(1.0, out.abs().max().item()):
            return f"merge changed the outputs by {gap:.2e}"
    return None


def peft_default_targets(arch: str) -> str:
    """PEFT's default LoRA target modules for the model type, for comparison ('-' when PEFT has none)."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets
    except ImportError:
        return "-"
    model, _ = backbone_zoo.build(arch)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    found = targets.get(model_type) if model_type else None
    return ", ".join(sorted(found)) if found else "-"


def main() -> None:
    """Run the whole matrix; write tests/backbone_matrix.json and the table in docs/backbone_matrix.md."""
    import json
    import time
    import warnings
    from pathlib import Path

    from petl_tpr.backbones import discover

    warnings.filterwarnings("ignore")
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    root = Path(__file__).resolve().parent.parent
    results: dict[str, dict] = {}
    start = time.time()
    for arch in backbone_zoo.ZOO:
        model, _ = backbone_zoo.build(arch)
        try:
            branches = "; ".join(f"{b.name}: {len(b.blocks)} ({b.family})" for b in discover(model).branches.values())
        except pt.PetlError as error:
            branches = f"not found ({type(error).__name__})"
        row = {"branches": branches, "peft_lora_default": peft_default_targets(arch), "presets": {}}
        for preset in PRESETS:
            status, detail = classify(arch, preset)
            row["presets"][preset] = {"status": status, "detail": detail}
        results[arch] = row
        print(f"{arch:24s} " + " ".join(f"{p}={r['status']}" for p, r in row["presets"].items()), flush=True)
    (root / "tests" / "backbone_matrix.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    mark = {"served": "yes", "refused": "refused", "forward-error": "error at forward", "SILENT": "**SILENT**"}
    lines = ["# Backbone matrix", "",
             "Generated by `python tests/backbone_matrix.py` (every preset on every architecture of "
             "`tests/backbone_zoo.py`, built from its config with random weights and constant-valued weights "
             "randomised). `tests/test_backbone_matrix.py` checks that the code still gives this table. "
             "*yes*: injected; untrained adapters leave the outputs as they were (identity methods), perturbed "
             "ones all run and change them, a backward pass reaches every adapter tensor and no base parameter, "
             "saved and loaded into a fresh build they give the same outputs (merged LoRA too), and eject gives "
             "the model back bit for bit. *refused*: a clear "
             "`PetlError` at `inject`, the model untouched (the reasons are listed below the table). "
             f"Run time: {time.time() - start:.0f} s.", "",
             "| architecture | branches found | " + " | ".join(PRESETS) + " | PEFT LoRA default |",
             "|---|---|" + "---|" * len(PRESETS) + "---|"]
    reasons = []
    for arch, row in results.items():
        cells = [mark[row["presets"][p]["status"]] for p in PRESETS]
        lines.append(f"| {arch} | {row['branches']} | " + " | ".join(cells) + f" | {row['peft_lora_default']} |")
        for preset, result in row["presets"].items():
            if result["status"] != "served":
                reasons.append(f"- {arch}, {preset}: {result['detail']}")
    lines += ["", "## Why not", ""] + sorted(set(reasons), key=reasons.index)
    (root / "docs" / "backbone_matrix.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from petl_tpr.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    main()
