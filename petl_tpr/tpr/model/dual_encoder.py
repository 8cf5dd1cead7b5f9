"""The retrieval model: a CLIP dual encoder from transformers or open_clip, at 384 x 128.

`DualEncoder` wraps either build and gives IRRA's features: the image feature is the projection
of token 0 after the final LayerNorm, the text feature the projection at the EOT position
(`argmax` of the ids, since EOT 49407 is the largest id). `load_clip` reads pretrained weights and
`build_clip` makes a randomly initialised model from a config; both resize the vision position
embedding to the target grid once, as a weight change (see `position.py`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .clip_files import openai_config, read_state_dict, read_transformers_weights
from ..errors import TaskInputError
from .position import pair, resize_grid_embedding, resize_position_embedding, square_grid

IMAGE_SIZE = (384, 128)
SOURCES = ("auto", "transformers", "open_clip")
_OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")


def clip_kind(clip: nn.Module) -> str:
    """`"transformers"` for a `CLIPModel`, `"open_clip"` for an open_clip `CLIP` / `CustomTextCLIP`."""
    if all(hasattr(clip, name) for name in ("vision_model", "text_model", "visual_projection", "text_projection")):
        return "transformers"
    if hasattr(clip, "visual") and hasattr(clip, "encode_text") and hasattr(clip, "encode_image"):
        return "open_clip"
    raise TaskInputError(f"{type(clip).__name__} is neither a transformers CLIPModel nor an open_clip CLIP")


class DualEncoder(nn.Module):
    """CLIP image and text towers giving unnormalised projected features.

    `encode_image(images (B, 3, H, W)) -> (B, E)`, `encode_text(ids (B, L)) -> (B, E)`,
    `forward(images, ids) -> (image_features, text_features)`. The wrapped model is `.clip`
    (inject adapters there). For transformers the text attention mask is `ids != pad_id`.
    """

    def __init__(self, clip: nn.Module, *, pad_id: int = 0):
        super().__init__()
        self.clip = clip
        self.kind = clip_kind(clip)
        self.pad_id = pad_id

    @property
    def image_size(self) -> tuple[int, int]:
        if self.kind == "transformers":
            return pair(self.clip.vision_model.embeddings.image_size)
        return pair(self.clip.visual.image_size)

    @property
    def embed_dim(self) -> int:
        if self.kind == "transformers":
            return self.clip.visual_projection.out_features
        return int(self.clip.visual.output_dim)

    @property
    def context_length(self) -> int:
        if self.kind == "transformers":
            return int(self.clip.config.text_config.max_position_embeddings)
        return int(self.clip.context_length)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise TaskInputError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if self.kind == "transformers":
            pooled = self.clip.vision_model(pixel_values=images).pooler_output   # post_layernorm(token 0)
            return self.clip.visual_projection(pooled)
        return self.clip.encode_image(images)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.dtype.is_floating_point:
            raise TaskInputError(f"ids must be integer (B, L), got {ids.dtype} of shape {tuple(ids.shape)}")
        if self.kind == "transformers":
            mask = (ids != self.pad_id).long()
            hidden = self.clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state   # final LN applied
            pooled = hidden[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
            return self.clip.text_projection(pooled)
        return self.clip.encode_text(ids)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(ids)


# ---------------------------------------------------------------------------------------- build


def _import_open_clip():
    from ...compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip

    return open_clip


def _import_transformers():
    from ...compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import transformers

    return transformers


def _open_clip_config(name: str) -> dict:
    config = _import_open_clip().get_model_config(name.replace("/", "-"))
    if config is None:
        raise TaskInputError(f"unknown open_clip model {name!r} (see open_clip.list_models())")
    return config


def _build_transformers(config, image_size) -> nn.Module:
    transformers = _import_transformers()
    native = config.vision_config.image_size
    target = pair(native if image_size is None else image_size)
    if not isinstance(native, int):            # a config saved after a resize: build square, then resize
        config = copy.deepcopy(config)
        config.vision_config.image_size = pair(native)[0]
    clip = transformers.CLIPModel(config)
    if target != pair(clip.config.vision_config.image_size):
        resize_position_embedding(clip, target)
    return clip


def _build_open_clip(config: dict, image_size, quick_gelu: bool | None) -> nn.Module:
    open_clip = _import_open_clip()
    config = copy.deepcopy(config)
    vision, text = config.setdefault("vision_cfg", {}), config.setdefault("text_cfg", {})
    if "multimodal_cfg" in config or "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)):
        raise TaskInputError("only open_clip ViT CLIPs with open_clip's own vision tower are supported")
    if image_size is not None:
        height, width = vision["image_size"] = pair(image_size)
        patch = pair(vision.get("patch_size", 16))
        if height % patch[0] or width % patch[1]:
            raise TaskInputError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
    if quick_gelu is not None:
        config["quick_gelu"] = quick_gelu
    custom = config.pop("custom_text", False) or "hf_model_name" in text
    if "hf_model_name" in text:
        text.setdefault("hf_model_pretrained", False)    # never download text-tower weights here
    return (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**config)


def build_clip(config_or_arch, image_size=IMAGE_SIZE, *, quick_gelu: bool | None = None,
               pad_id: int = 0) -> DualEncoder:
    """A randomly initialised `DualEncoder` from a config, at `image_size` (`None`: the config's).

    `config_or_arch`: a transformers `CLIPConfig`, an open_clip model config dict (`embed_dim`,
    `vision_cfg`, `text_cfg`, optional `quick_gelu`, `custom_text`) or an open_clip model name
    (`"ViT-B-16"`). open_clip models are built at the target size directly; a transformers
    model is built at its configured square size and its position embedding resized.
    """
    if isinstance(config_or_arch, str):
        clip = _build_open_clip(_open_clip_config(config_or_arch), image_size, quick_gelu)
    elif isinstance(config_or_arch, dict):
        clip = _build_open_clip(config_or_arch, image_size, quick_gelu)
    elif hasattr(config_or_arch, "vision_config") and hasattr(config_or_arch, "text_config"):
        clip = _build_transformers(config_or_arch, image_size)
    else:
        raise TaskInputError(f"cannot build a CLIP from {type(config_or_arch).__name__}")
    return DualEncoder(clip, pad_id=pad_id)


# ----------------------------------------------------------------------------------------- load


def resolve_source(name_or_path: str | Path, pretrained: str | None = None) -> str:
    """Which library `load_clip` uses for `name_or_path` (rules in `load_clip`'s docstring)."""
    path = Path(name_or_path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return "transformers"
        if (path / "open_clip_config.json").is_file():
            return "open_clip"
        raise TaskInputError(f"{path} holds neither config.json (transformers) nor open_clip_config.json")
    name = str(name_or_path)
    if path.is_file() or pretrained is not None or name.startswith(_OPEN_CLIP_SCHEMAS):
        return "open_clip"
    if _import_open_clip().get_model_config(name.replace("/", "-")) is not None:
        return "open_clip"
    return "transformers"


def _load_transformers(name: str | Path, image_size) -> nn.Module:
    transformers = _import_transformers()
    config = transformers.CLIPConfig.from_pretrained(str(name))
    if isinstance(config.vision_config.image_size, int):
        clip = transformers.CLIPModel.from_pretrained(str(name), dtype=torch.float32)
    else:                                      # saved after a resize: CLIPModel cannot rebuild it itself
        if not Path(name).is_dir():
            raise TaskInputError(f"{name}: a rectangular image size is only read from a local folder")
        clip = _build_transformers(config, None)
        clip.load_state_dict(read_transformers_weights(name), strict=True)
    if image_size is not None and pair(image_size) != pair(clip.config.vision_config.image_size):
        resize_position_embedding(clip, image_size)
    return clip


def _fit_open_clip_state(clip: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapt a state dict to `clip`: text-tower prefix, logit shapes, stray keys, the position grid."""
    state = dict(state)
    if "positional_embedding" in state and not hasattr(clip, "positional_embedding"):
        prefixes = ("text_projection", "positional_embedding", "token_embedding", "transformer", "ln_final")
        state = {("text." + k if k.startswith(prefixes) else k): v for k, v in state.items()}
    own = clip.state_dict()
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in own:
            state[key] = state[key].reshape(own[key].shape)
    if "logit_bias" in own and "logit_bias" not in state:
        state["logit_bias"] = torch.zeros_like(own["logit_bias"])
    state = {k: v for k, v in state.items() if k in own or not k.split(".")[-1] == "attn_mask"}
    key = "visual.positional_embedding"
    if key in state and key in own and state[key].shape[0] != own[key].shape[0]:
        state[key] = resize_grid_embedding(state[key], square_grid(state[key].shape[0] - 1),
                                           pair(clip.visual.grid_size))
    return state


def _load_open_clip(name: str | Path, pretrained: str | Path | None, image_size, quick_gelu: bool | None,
                    cache_dir: str | None) -> nn.Module:
    open_clip = _import_open_clip()
    name = str(name)
    if name.startswith(_OPEN_CLIP_SCHEMAS) or Path(name).is_dir():
        name = name if name.startswith(_OPEN_CLIP_SCHEMAS) else f"local-dir:{name}"
        clip = open_clip.create_model(name, cache_dir=cache_dir, force_quick_gelu=bool(quick_gelu))
        if image_size is not None and pair(image_size) != pair(clip.visual.image_size):
            resize_position_embedding(clip, image_size)
        return clip
    if Path(name).is_file():
        if pretrained is not None:
            raise TaskInputError("give either a checkpoint file or a model name with pretrained=, not both")
        config, checkpoint = None, Path(name)
    else:
        config = _open_clip_config(name)
        if pretrained is None:
            raise TaskInputError(f"open_clip model {name!r} needs pretrained= (a tag or a checkpoint file); "
                                 "use build_clip for random weights")
        if Path(pretrained).is_file():
            checkpoint = Path(pretrained)
        else:
            tag = open_clip.get_pretrained_cfg(name.replace("/", "-"), str(pretrained))
            if not tag:
                raise TaskInputError(f"{pretrained!r} is neither a file nor a pretrained tag of {name!r} "
                                     f"(tags: {open_clip.list_pretrained_tags_by_model(name.replace('/', '-'))})")
            checkpoint = open_clip.download_pretrained(tag, cache_dir=cache_dir)
            if quick_gelu is None:
                quick_gelu = bool(tag.get("quick_gelu", False))
    state = read_state_dict(checkpoint)
    if config is None:
        config = openai_config(state)
        if quick_gelu is None:
            quick_gelu = True                  # the OpenAI layout: OpenAI's models use QuickGELU
    native = config["vision_cfg"].get("image_size", 224)
    clip = _build_open_clip(config, native if image_size is None else image_size, quick_gelu)
    clip.load_state_dict(_fit_open_clip_state(clip, state), strict=True)
    return clip


def load_clip(name_or_path: str | Path, *, pretrained: str | Path | None = None, image_size=IMAGE_SIZE,
              source: str = "auto", quick_gelu: bool | None = None, cache_dir: str | None = None,
              pad_id: int = 0) -> DualEncoder:
    """A pretrained CLIP as a float32 `DualEncoder` in eval mode, at `image_size` (`None`: native).

    Sources (`source="auto"` picks in this order):

    - a folder with `config.json`: transformers `CLIPModel.from_pretrained` (a folder written by
      `save_pretrained`, also one saved after a resize);
    - a folder with `open_clip_config.json`, or an `hf-hub:` / `local-dir:` name: open_clip's
      `create_model`, then the in-place resize;
    - a checkpoint file (`.safetensors`, `.pt`, `.pth`, `.bin`, OpenAI's TorchScript `.pt`): an
      OpenAI-layout ViT whose architecture is read off the weights (QuickGELU unless
      `quick_gelu=False`);
    - an open_clip model name (`"ViT-B-16"`, `"ViT-B/16"`) with `pretrained=` a checkpoint file
      (the config's activation unless `quick_gelu` is given) or a pretrained tag (downloaded
      through open_clip's cache; the tag's QuickGELU setting);
    - anything else: a transformers hub name through `CLIPModel.from_pretrained`.

    For open_clip files and tags the vision position embedding is resized bilinearly in the state
    dict before a strict `load_state_dict`; other routes load at the native size and resize in place.
    """
    if source not in SOURCES:
        raise TaskInputError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "auto":
        source = resolve_source(name_or_path, pretrained)
    if source == "transformers":
        if pretrained is not None:
            raise TaskInputError("pretrained= is for open_clip; transformers reads weights from name_or_path")
        clip = _load_transformers(name_or_path, image_size)
    else:
        clip = _load_open_clip(name_or_path, pretrained, image_size, quick_gelu, cache_dir)
    return DualEncoder(clip.float(), pad_id=pad_id).eval()
