"""Reading CLIP weights from files: open_clip / OpenAI checkpoints and transformers folders.

Checkpoint formats met in practice (open_clip 3.x, OpenAI's releases):

- `.safetensors`: a flat state dict.
- `.pt` / `.pth` / `.bin` pickles: a state dict, or a dict with the state dict under `state_dict`
  (open_clip training checkpoints, whose keys start with `module.` when saved from DDP).
- OpenAI's released `ViT-B-16.pt` etc.: a TorchScript archive. `torch.load(weights_only=True)`
  refuses TorchScript archives, so those go through `torch.jit.load(...).state_dict()`, which
  adds the non-weight entries `input_resolution`, `context_length` and `vocab_size` (dropped
  here). Its weights are float16 and its keys use the CLIP layout with the text tower at the root
  (`token_embedding`, `positional_embedding`, `transformer.resblocks.*`, `ln_final`,
  `text_projection`) and the image tower under `visual.` (`conv1`, `class_embedding`,
  `positional_embedding` of `1 + 14 * 14` rows, `ln_pre`, `transformer.resblocks.*`, `ln_post`,
  `proj`). open_clip's `CLIP` class has the same layout; `CustomTextCLIP` moves the text tower
  under `text.`.
- OpenAI's models were trained with QuickGELU (`x * sigmoid(1.702 x)`). open_clip's plain
  `ViT-B-16` config uses `nn.GELU`; the `openai` tag and the `-quickgelu` configs set
  `quick_gelu=True`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..errors import TaskInputError

# Entries of OpenAI's TorchScript state dict (and traced open_clip models) that are not weights.
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file (formats in the module docstring), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise TaskInputError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            with warnings.catch_warnings():      # torch.load warns before refusing a TorchScript archive
                warnings.filterwarnings("ignore", message=".*TorchScript archive")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as error:
            if "TorchScript" not in str(error):
                raise
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise TaskInputError(f"{path} does not hold a state dict")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return {key: value for key, value in state.items()
            if key not in NON_WEIGHT_KEYS and isinstance(value, torch.Tensor)}


def is_openai_layout(state: dict[str, torch.Tensor]) -> bool:
    """True for the OpenAI / open_clip `CLIP` layout of a ViT (text tower at the root)."""
    return all(key in state for key in ("visual.proj", "visual.conv1.weight", "positional_embedding",
                                        "token_embedding.weight", "text_projection", "ln_final.weight"))


def openai_config(state: dict[str, torch.Tensor]) -> dict:
    """An open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`) read off an OpenAI-layout ViT.

    Head widths are 64 in both towers, as in every OpenAI ViT. The config has no `quick_gelu`;
    the caller decides.
    """
    if not is_openai_layout(state):
        raise TaskInputError("cannot infer the architecture: not an OpenAI-layout CLIP ViT state dict "
                             "(give the open_clip model name, e.g. load_clip('ViT-B-16', pretrained=path))")
    conv = state["visual.conv1.weight"]
    patch = conv.shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)

    def layers(prefix: str) -> int:      # distinct block indices under `prefix`
        return len({key[len(prefix):].split(".")[0] for key in state if key.startswith(prefix)})

    text_width = state["ln_final.weight"].shape[0]
    return {
        "embed_dim": state["text_projection"].shape[1],
        "vision_cfg": {"image_size": grid * patch, "layers": layers("visual.transformer.resblocks."),
                       "width": conv.shape[0], "patch_size": patch, "head_width": 64},
        "text_cfg": {"context_length": state["positional_embedding"].shape[0],
                     "vocab_size": state["token_embedding.weight"].shape[0], "width": text_width,
                     "heads": max(1, text_width // 64), "layers": layers("transformer.resblocks.")},
    }


def read_transformers_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights `save_pretrained` wrote into `folder` (one file or shards; safetensors or .bin)."""
    folder = Path(folder)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for name in files:
                state.update(read_state_dict(folder / name))
            return state
        if (folder / single).is_file():
            return read_state_dict(folder / single)
    raise TaskInputError(f"no model.safetensors or pytorch_model.bin in {folder}")
