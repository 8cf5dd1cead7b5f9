"""Hugging Face training loops: transformers `Trainer` and accelerate, with adapter-only checkpoints.

- `PetlTrainer` (a `transformers.Trainer`) and `PetlTrainerMixin` (for your own Trainer subclass:
  `class MyTrainer(PetlTrainerMixin, Seq2SeqTrainer)`): every save (`checkpoint-N/`, `save_model`)
  writes the adapter-only folder of `checkpoint.py` instead of the whole model, and
  `train(resume_from_checkpoint=...)` / `load_best_model_at_end` load it back. The optimiser,
  scheduler, scaler, RNG states and trainer state are saved and restored by the Trainer as usual.
- `register_accelerate_hooks(accelerator)`: the same for `accelerator.save_state` / `load_state`.
- `save_pretrained`, `from_pretrained`, `patch_save_pretrained` (`pretrained.py`).

Importing this module needs torch only: transformers is imported on first use of `PetlTrainer`.
See docs/integrations.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from .checkpoint import (MANIFEST, injected_modules, is_checkpoint, load_adapter_folder, read_manifest,
                         save_adapter_folder)
from .pretrained import from_pretrained, is_patched, patch_save_pretrained, save_pretrained

__all__ = ["PetlTrainer", "PetlTrainerMixin", "from_pretrained", "is_checkpoint", "is_patched",
           "load_adapter_folder", "patch_save_pretrained", "read_manifest", "register_accelerate_hooks",
           "save_adapter_folder", "save_pretrained"]

TRAINING_ARGS_NAME = "training_args.bin"     # transformers' name for the pickled TrainingArguments


def patch_transformers_modules(model: nn.Module) -> None:
    """`patch_save_pretrained` on every module of `model` that has a `save_pretrained` and adapters in it."""
    injected = list(injected_modules(model))
    for path, module in model.named_modules():
        inside = [p for p in injected if path == "" or p == path or p.startswith(path + ".")]
        if inside and hasattr(type(module), "save_pretrained"):
            patch_save_pretrained(module)


class PetlTrainerMixin:
    """Adapter-only saving and loading for a `transformers.Trainer` subclass (put it first in the bases).

    Refused at construction: a model with nothing injected (use the plain Trainer), DeepSpeed and
    FSDP (they shard the parameters this class reads). Transformers modules inside the model get
    `patch_save_pretrained`, so a `save_pretrained` on them after training keeps the adapters too.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        model = self._petl_model()
        if not injected_modules(model):
            raise InputError(f"nothing is injected in this {type(model).__name__}; PetlTrainer saves adapters "
                             f"only (inject first, or use transformers.Trainer)")
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise InputError("PetlTrainer does not support DeepSpeed or FSDP (sharded parameters); "
                             "use plain DDP (torchrun) or one process")
        patch_transformers_modules(model)

    def _petl_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter-only folder (adapters with spec, other trainables, manifest), the processing
        class and the training arguments; never the base weights."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is not None:
            raise CheckpointError("PetlTrainer was handed a gathered state dict (DeepSpeed, FSDP or SageMaker "
                                  "model parallel), which it does not support")
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter_folder(self._petl_model(), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not is_checkpoint(resume_from_checkpoint):
            if os.path.isdir(resume_from_checkpoint):
                raise CheckpointError(f"{resume_from_checkpoint} has no {MANIFEST}: it is not a checkpoint written "
                                      f"by PetlTrainer (a plain Trainer checkpoint holds the whole model)")
            raise CheckpointError(f"{resume_from_checkpoint}: no such checkpoint folder")
        target = self._petl_model() if model is None else self.accelerator.unwrap_model(model, keep_torch_compile=False)
        load_adapter_folder(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if not is_checkpoint(best):
            raise CheckpointError(f"best checkpoint {best} has no {MANIFEST}")
        load_adapter_folder(self._petl_model(), best)


def _trainer_class():
    from ..compat import ensure_torchvision_importable

    ensure_torchvision_importable()     # before transformers on CPU-only torch
    from transformers import Trainer

    return type("PetlTrainer", (PetlTrainerMixin, Trainer),
                {"__doc__": "`transformers.Trainer` with adapter-only checkpoints (see PetlTrainerMixin).",
                 "__module__": __name__})


def register_accelerate_hooks(accelerator: Any) -> tuple[Any, Any]:
    """Make `accelerator.save_state` / `load_state` adapter-only for every prepared model with an injection.

    `save_state(dir)` writes such a model's adapter folder as `dir/petl_model_<i>/` (i: its place
    among the prepared models) instead of `model[_i].safetensors`; the optimiser, schedulers, sampler,
    scaler and RNG files are accelerate's own. `load_state(dir)` loads that folder and leaves the
    other models to accelerate. Returns the two hook handles (`.remove()` undoes the registration).
    """
    def subfolder(directory: str, index: int) -> Path:
        return Path(directory) / f"petl_model_{index}"

    def save_hook(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        for index in reversed(range(len(models))):
            model = accelerator.unwrap_model(models[index])
            if injected_modules(model):
                if accelerator.is_main_process:
                    save_adapter_folder(model, subfolder(output_dir, index))
                weights.pop(index)

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        for index in reversed(range(len(models))):
            if is_checkpoint(subfolder(input_dir, index)):
                load_adapter_folder(accelerator.unwrap_model(models[index]), subfolder(input_dir, index))
                models.pop(index)

    return accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)


def __getattr__(name: str):
    if name == "PetlTrainer":
        cls = _trainer_class()
        globals()["PetlTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
