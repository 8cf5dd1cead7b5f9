"""CLIP dual encoders: loading from transformers folders and open_clip checkpoints, the 384x128 resize,
feature heads, adapter injection. Tiny models with random weights; files are written to tmp_path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from petl_tpr.compat import ensure_torchvision_importable

ensure_torchvision_importable()

import open_clip  # noqa: E402
import petl_tpr as pt  # noqa: E402
import petl_tpr.tpr as tpr  # noqa: E402
from petl_tpr.tpr.model.position import resize_grid_embedding  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

POS_HF = "vision_model.embeddings.position_embedding.weight"
POS_OC = "visual.positional_embedding"
# open_clip config in OpenAI's layout with 64-wide heads, so the architecture can also be read off the weights.
OPEN_CLIP_CFG = {"embed_dim": 16, "quick_gelu": True,
                 "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 16, "head_width": 64},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}


def direct_resize(weight: torch.Tensor, source, target) -> torch.Tensor:
    """The reference: bilinear F.interpolate (align_corners=False, IRRA's resize) of the grid, CLS kept.

    align_corners=False puts each embedding at the centre of its patch cell, so the resized grid
    covers the same image area; IRRA and open_clip's own resize use it too.
    """
    grid = weight[1:].reshape(1, *source, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=target, mode="bilinear", align_corners=False)
    return torch.cat([weight[:1], grid.permute(0, 2, 3, 1).reshape(target[0] * target[1], -1)])


def hf_config() -> CLIPConfig:
    return CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=16),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=0),
        projection_dim=16)


def captions(lengths=(5, 12, 77)) -> torch.Tensor:
    """IRRA-style ids: SOT, words, EOT (the largest id), zero padding; one caption fills all 77."""
    g = torch.Generator().manual_seed(3)
    ids = torch.zeros(len(lengths), 77, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 49405, (n,), generator=g)
        ids[row, 0], ids[row, n - 1] = tpr.SOT_ID, tpr.EOT_ID
    return ids


def images(h=384, w=128, batch=3) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    torch.manual_seed(0)
    clip = CLIPModel(hf_config()).eval()
    folder = tmp_path_factory.mktemp("hf_clip")
    clip.save_pretrained(folder)
    return clip, folder


@pytest.fixture
def open_clip_saved(tmp_path, monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tpr-tiny", OPEN_CLIP_CFG)
    torch.manual_seed(1)
    clip = open_clip.CLIP(**OPEN_CLIP_CFG).eval()
    torch.save(clip.state_dict(), tmp_path / "tiny.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    return clip, tmp_path


def test_resize_is_bilinear_with_cls_kept():
    weight = torch.randn(1 + 14 * 14, 8)
    out = resize_grid_embedding(weight, (14, 14), (24, 8))
    assert out.shape == (193, 8)
    torch.testing.assert_close(out, direct_resize(weight, (14, 14), (24, 8)), rtol=0, atol=0)
    assert torch.equal(out[0], weight[0])
    torch.testing.assert_close(resize_grid_embedding(weight, (14, 14), (14, 14)), weight, rtol=0, atol=0)
    # row-major layout: an embedding equal to its row index stays constant along each resized row
    rows = torch.arange(14.0).repeat_interleave(14)[:, None]
    out = resize_grid_embedding(torch.cat([torch.zeros(1, 1), rows]), (14, 14), (24, 8))[1:].reshape(24, 8)
    assert torch.allclose(out, out[:, :1].expand(24, 8)) and bool((out[1:, 0] >= out[:-1, 0]).all())
    with pytest.raises(tpr.TaskInputError):
        resize_grid_embedding(weight[:-1], (14, 14), (24, 8))


def test_transformers_folder_loads_with_resized_position_embedding(hf_saved):
    clip, folder = hf_saved
    assert tpr.resolve_source(folder) == "transformers"
    model = tpr.load_clip(folder)
    assert model.kind == "transformers" and not model.training
    assert model.image_size == (384, 128) and model.embed_dim == 16 and model.context_length == 77
    assert model.clip.config.vision_config.image_size == [384, 128]
    before, after = clip.state_dict(), model.clip.state_dict()
    assert set(before) == set(after)
    for key in before:
        if key != POS_HF:
            assert torch.equal(before[key], after[key]), key
    assert after[POS_HF].shape == (193, 32)
    torch.testing.assert_close(after[POS_HF], direct_resize(before[POS_HF], (14, 14), (24, 8)), rtol=0, atol=0)
    with torch.no_grad():
        image_features, text_features = model(images(), captions())
    assert image_features.shape == (3, 16) and text_features.shape == (3, 16)
    with pytest.raises(tpr.TaskInputError):
        model.encode_image(images(224, 224))


def test_transformers_features_match_clip_heads(hf_saved):
    clip, folder = hf_saved
    model = tpr.load_clip(folder, image_size=None)      # native 224x224: nothing resized
    assert model.image_size == (224, 224)
    pixels, ids = images(224, 224), captions()
    with torch.no_grad():
        image_ref = clip.get_image_features(pixel_values=pixels).pooler_output
        text_ref = clip.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output
        torch.testing.assert_close(model.encode_image(pixels), image_ref)
        torch.testing.assert_close(model.encode_text(ids), text_ref)
        # the EOT (argmax) position, not the last non-pad or the last position
        hidden = clip.text_model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        manual = clip.text_projection(hidden[torch.arange(3), torch.tensor([4, 11, 76])])
        torch.testing.assert_close(model.encode_text(ids), manual)


def test_transformers_resized_save_reloads(hf_saved, tmp_path):
    _, folder = hf_saved
    model = tpr.load_clip(folder)
    model.clip.save_pretrained(tmp_path / "resized")
    again = tpr.load_clip(tmp_path / "resized")
    assert again.image_size == (384, 128)
    with torch.no_grad():
        torch.testing.assert_close(again(images(), captions()), model(images(), captions()), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", ["pt", "safetensors"])
def test_open_clip_checkpoint_with_arch_name(open_clip_saved, suffix):
    clip, folder = open_clip_saved
    path = folder / f"tiny.{suffix}"
    assert tpr.resolve_source("tpr-tiny", str(path)) == "open_clip"
    same = tpr.load_clip("tpr-tiny", pretrained=path, image_size=None)
    assert same.kind == "open_clip" and same.image_size == (224, 224)
    pixels, ids = images(224, 224), captions()
    with torch.no_grad():
        torch.testing.assert_close(same.encode_image(pixels), clip.encode_image(pixels), rtol=0, atol=0)
        torch.testing.assert_close(same.encode_text(ids), clip.encode_text(ids), rtol=0, atol=0)
    model = tpr.load_clip("tpr-tiny", pretrained=path)
    assert model.image_size == (384, 128) and model.clip.visual.grid_size == (24, 8)
    before, after = clip.state_dict(), model.clip.state_dict()
    assert set(before) == set(after)
    for key in before:
        if key != POS_OC:
            assert torch.equal(before[key], after[key]), key
    torch.testing.assert_close(after[POS_OC], direct_resize(before[POS_OC], (14, 14), (24, 8)), rtol=0, atol=0)
    with torch.no_grad():
        image_features, text_features = model(images(), ids)
    assert image_features.shape == (3, 16) and text_features.shape == (3, 16)


def test_open_clip_text_feature_is_at_eot(open_clip_saved):
    clip, folder = open_clip_saved
    model = tpr.load_clip("tpr-tiny", pretrained=folder / "tiny.pt")
    ids = captions()
    with torch.no_grad():
        x = clip.token_embedding(ids) + clip.positional_embedding
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        manual = x[torch.arange(3), torch.tensor([4, 11, 76])] @ clip.text_projection
        torch.testing.assert_close(model.encode_text(ids), manual)


def test_openai_layout_files_infer_the_architecture(open_clip_saved):
    """A bare file (no model name): the architecture is read off the weights, QuickGELU assumed.

    Covers OpenAI's release formats: a TorchScript archive and a float16 state dict.
    """
    clip, folder = open_clip_saved
    pixels, ids = images(224, 224, batch=2), captions((6, 20))
    traced = torch.jit.trace(clip, (pixels, ids), check_trace=False)
    torch.jit.save(traced, str(folder / "jit.pt"))
    model = tpr.load_clip(folder / "jit.pt", image_size=None)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels, ids), (clip.encode_image(pixels), clip.encode_text(ids)),
                                   rtol=0, atol=0)
    torch.save({k: v.half() for k, v in clip.state_dict().items()}, folder / "half.pt")
    model = tpr.load_clip(folder / "half.pt")
    assert model.image_size == (384, 128)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.clip.visual.proj, clip.visual.proj.half().float())


def test_load_errors(open_clip_saved, tmp_path):
    _, folder = open_clip_saved
    with pytest.raises(tpr.TaskInputError, match="pretrained="):
        tpr.load_clip("tpr-tiny")
    with pytest.raises(tpr.TaskInputError, match="neither a file nor a pretrained tag"):
        tpr.load_clip("tpr-tiny", pretrained="no-such-tag")
    with pytest.raises(tpr.TaskInputError, match="source"):
        tpr.load_clip("tpr-tiny", source="timm")
    with pytest.raises(tpr.TaskInputError, match="patch size"):
        tpr.load_clip("tpr-tiny", pretrained=folder / "tiny.pt", image_size=(380, 128))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(tpr.TaskInputError, match="architecture"):
        tpr.load_clip(tmp_path / "other.pt")


def test_build_clip_from_configs():
    hf = tpr.build_clip(hf_config())
    oc = tpr.build_clip(OPEN_CLIP_CFG, (384, 128))
    for model in (hf, oc):
        assert model.image_size == (384, 128)
        with torch.no_grad():
            features = model(images(batch=2), captions((5, 9)))
        assert [tuple(f.shape) for f in features] == [(2, 16), (2, 16)]
    assert tpr.build_clip(OPEN_CLIP_CFG, None).image_size == (224, 224)


@pytest.mark.parametrize("kind", ["transformers", "open_clip"])
def test_up_person_injects_into_both(kind):
    model = tpr.build_clip(hf_config() if kind == "transformers" else OPEN_CLIP_CFG).eval()
    pixels, ids = images(batch=2), captions((5, 9))
    with torch.no_grad():
        plain = model(pixels, ids)
    pt.inject(model.clip, "up-person")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and len(trainable) < len(list(model.parameters()))
    image_features, text_features = model(pixels, ids)
    assert image_features.shape == (2, 16) and text_features.shape == (2, 16)
    (image_features.sum() + text_features.sum()).backward()
    assert all(p.grad is not None for p in trainable)
    assert not torch.equal(plain[1], text_features.detach())   # S-Prefix already moves the features


def test_open_clip_local_dir_resizes_in_place(open_clip_saved):
    """open_clip's own folder format goes through create_model and then the in-place resize."""
    import json

    clip, folder = open_clip_saved
    local = folder / "local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": {}}))
    (folder / "tiny.safetensors").rename(local / "open_clip_model.safetensors")
    assert tpr.resolve_source(local) == "open_clip"
    model = tpr.load_clip(local)
    reference = tpr.load_clip("tpr-tiny", pretrained=folder / "tiny.pt")
    assert model.image_size == (384, 128) and model.clip.visual.preprocess_cfg["size"] == (384, 128)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
