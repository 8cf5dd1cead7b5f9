"""Tiny models of many architectures, built from their configs with random weights (no download).

Each zoo entry returns `(model, run)`: `run(model)` feeds fixed inputs and returns one float tensor.
Constant-valued weights (zero biases, unit norms, tiny layer scales) are randomised by
`randomise_constants`, so a dropped bias or a bypassed branch changes the outputs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Zoo = dict[str, Callable[[], tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]]]
W = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pixels(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=_g())


def _ids(vocab: int = 100, length: int = 9, batch: int = 2, low: int = 3) -> torch.Tensor:
    return torch.randint(low, vocab - 2, (batch, length), generator=_g())


def _hf_vision(config_cls: str, model_cls: str, out: str = "last_hidden_state", **config):
    def build():
        import transformers

        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()

        def run(m):
            return getattr(m(pixel_values=_pixels(config.get("image_size", 32))), out).flatten()

        return model, run
    return build


def _hf_text(config_cls: str, model_cls: str, mask: bool = True, **config):
    def build():
        import transformers

        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()

        def run(m):
            ids = _ids(config.get("vocab_size", 100))
            kwargs = {}
            if mask:
                attention_mask = torch.ones_like(ids)
                attention_mask[1, 6:] = 0
                kwargs["attention_mask"] = attention_mask
            hidden = m(input_ids=ids, **kwargs).last_hidden_state
            return (hidden[kwargs["attention_mask"].bool()] if mask else hidden).flatten()

        return model, run
    return build


def _hf_dual(config_cls: str, model_cls: str, vision: dict, text: dict, **extra):
    def build():
        import transformers

        config = getattr(transformers, config_cls)(vision_config=vision, text_config=text, **extra)
        model = getattr(transformers, model_cls)(config).eval()

        def run(m):
            ids = _ids(text.get("vocab_size", 100))
            ids[:, -1] = text.get("vocab_size", 100) - 1
            out = m(input_ids=ids, pixel_values=_pixels(vision.get("image_size", 32)))
            return torch.cat([out.image_embeds.flatten(), out.text_embeds.flatten()])

        return model, run
    return build


def _timm(name: str, size: int = 32, **kwargs):
    def build():
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, **kwargs).eval()
        return model, lambda m: m(_pixels(size)).flatten()
    return build


def _open_clip(name: str, size: int = 32, vision: dict | None = None, text: dict | None = None, coca: bool = False):
    def build():
        import open_clip

        cls = open_clip.CoCa if coca else open_clip.CLIP
        kwargs = dict(multimodal_cfg=dict(width=32, heads=4, layers=1, context_length=12, vocab_size=100)) if coca else {}
        model = cls(embed_dim=16, vision_cfg=vision, text_cfg=text, **kwargs).eval()
        if coca:     # CoCa leaves its decoder's output projection as allocated (torch.empty): give it values
            torch.nn.init.normal_(model.text_decoder.text_projection, std=0.1)

        def run(m):
            text_ids = _ids(100, 12)
            text_ids[:, 8] = 99
            return torch.cat([m.encode_image(_pixels(size)).flatten(), m.encode_text(text_ids).flatten()])

        return model, run
    return build


def _torch_encoder(nested: bool):
    def build():
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=nested).eval()

        def run(m):
            x = torch.randn(2, 7, 32, generator=_g())
            pad = torch.zeros(2, 7, dtype=torch.bool)
            pad[1, 5:] = True
            return m(x, src_key_padding_mask=pad)[~pad].flatten()

        return model, run
    return build


class UserBlock(nn.Module):
    """A pre-norm block as a user writes it in plain PyTorch: separate q/k/v, SDPA, GELU MLP."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.out(a)
        return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))


class UserViT(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.blocks = nn.ModuleList(UserBlock(d) for _ in range(2))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def _user_vit():
    model = UserViT().eval()
    return model, lambda m: m(_pixels()).flatten()


def _siglip2():
    import transformers

    config = transformers.Siglip2VisionConfig(**W, patch_size=8, num_patches=16)
    model = transformers.Siglip2VisionModel(config).eval()

    def run(m):
        patches = torch.randn(2, 16, 3 * 8 * 8, generator=_g())
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 12:] = 0
        shapes = torch.tensor([[4, 4], [3, 4]])
        return m(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output.flatten()

    return model, run


def _open_clip_timm_tower():
    """open_clip CLIP whose image tower is a timm ViT (as in its SigLIP / EVA configs), made tiny."""
    import open_clip
    import timm

    text = dict(context_length=12, vocab_size=100, width=32, heads=4, layers=2, mlp_ratio=2.0)
    vision = dict(timm_model_name="vit_tiny_patch16_224", timm_pool="", timm_proj="linear", image_size=224)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()
    model.visual.trunk = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, global_pool="",
                                           img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4).eval()
    model.visual.head.proj = nn.Linear(32, 16, bias=False)
    model.visual.image_size = (32, 32)

    def run(m):
        text_ids = _ids(100, 12)
        text_ids[:, 8] = 99
        return torch.cat([m.encode_image(_pixels()).flatten(), m.encode_text(text_ids).flatten()])

    return model, run


def _bart_encoder():
    """BART's encoder alone: a norm after the embeddings (`layernorm_embedding`) and no final norm."""
    import transformers

    config = transformers.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                                     max_position_embeddings=32)
    model = transformers.BartModel(config).get_encoder().eval()
    return model, lambda m: m(input_ids=_ids()).last_hidden_state.flatten()


def _torchvision_swin():
    """torchvision's Swin: (B, H, W, C) hidden states, an attention that reads its qkv weight itself."""
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4]).eval()
    return model, lambda m: m(_pixels()).flatten()


def _torch_encoder_norm_first():
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True,
                                       norm_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    return model, lambda m: m(torch.randn(2, 7, 32, generator=_g())).flatten()


TEXT = dict(vocab_size=100, max_position_embeddings=32)
ZOO: Zoo = {
    "hf_clip": _hf_dual("CLIPConfig", "CLIPModel", dict(W, image_size=32, patch_size=8),
                        dict(W, vocab_size=100, max_position_embeddings=16, eos_token_id=99, bos_token_id=98,
                             pad_token_id=0), projection_dim=16),
    "hf_vit": _hf_vision("ViTConfig", "ViTModel", **W, image_size=32, patch_size=8),
    "hf_dinov2": _hf_vision("Dinov2Config", "Dinov2Model", **W, image_size=32, patch_size=8),
    "hf_dinov2_registers": _hf_vision("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", **W, image_size=32,
                                      patch_size=8, num_register_tokens=2),
    "hf_beit": _hf_vision("BeitConfig", "BeitModel", **W, image_size=32, patch_size=8,
                          use_relative_position_bias=True),
    "hf_data2vec_vision": _hf_vision("Data2VecVisionConfig", "Data2VecVisionModel", **W, image_size=32, patch_size=8,
                                     use_relative_position_bias=True),
    "hf_swin": _hf_vision("SwinConfig", "SwinModel", image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                          num_heads=[2, 4], window_size=4),
    "hf_siglip": _hf_dual("SiglipConfig", "SiglipModel", dict(W, image_size=32, patch_size=8),
                          dict(W, vocab_size=100, max_position_embeddings=16)),
    "hf_siglip2": _siglip2,
    "hf_blip": _hf_dual("BlipConfig", "BlipModel", dict(W, image_size=32, patch_size=8),
                        dict(W, vocab_size=100, max_position_embeddings=16), projection_dim=16),
    "hf_bert": _hf_text("BertConfig", "BertModel", **W, **TEXT),
    "hf_distilbert": _hf_text("DistilBertConfig", "DistilBertModel", dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                              **TEXT),
    "hf_albert": _hf_text("AlbertConfig", "AlbertModel", **W, embedding_size=16, **TEXT),
    "hf_deberta_v2": _hf_text("DebertaV2Config", "DebertaV2Model", **W, **TEXT),
    "hf_modernbert": _hf_text("ModernBertConfig", "ModernBertModel", **W, **TEXT, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=2,
                              local_attention=8),
    "hf_t5_encoder": _hf_text("T5Config", "T5EncoderModel", d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                              vocab_size=100),
    "hf_gpt2": _hf_text("GPT2Config", "GPT2Model", n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32),
    "hf_llama": _hf_text("LlamaConfig", "LlamaModel", **W, num_key_value_heads=2, **TEXT),
    "timm_vit": _timm("vit_tiny_patch16_224", patch_size=8, depth=2, embed_dim=32, num_heads=4),
    "timm_eva02": _timm("eva02_tiny_patch14_224", patch_size=8, depth=2, embed_dim=32, num_heads=4),
    "timm_beit": _timm("beit_base_patch16_224", patch_size=8, depth=2, embed_dim=32, num_heads=4),
    "open_clip": _open_clip("open_clip", vision=dict(layers=2, width=32, head_width=8, patch_size=8, image_size=32,
                                                       mlp_ratio=2.0),
                            text=dict(context_length=12, vocab_size=100, width=32, heads=4, layers=2, mlp_ratio=2.0)),
    "open_clip_coca": _open_clip("coca", coca=True,
                                 vision=dict(layers=2, width=32, head_width=8, patch_size=8, image_size=32,
                                             mlp_ratio=2.0),
                                 text=dict(context_length=12, vocab_size=100, width=32, heads=4, layers=2,
                                           mlp_ratio=2.0)),
    "open_clip_timm_vit": _open_clip_timm_tower,
    "torch_encoder": _torch_encoder(nested=False),
    "torch_encoder_nested": _torch_encoder(nested=True),
    "user_vit": _user_vit,
    # beyond the list: other encoders and decoders, to check the pattern rather than the names
    "hf_mpnet": _hf_text("MPNetConfig", "MPNetModel", **W, **TEXT),
    "hf_bart_encoder": _bart_encoder,
    "hf_opt": _hf_text("OPTConfig", "OPTModel", mask=False, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                       num_attention_heads=4, vocab_size=100, word_embed_proj_dim=32),
    "hf_gpt_neox": _hf_text("GPTNeoXConfig", "GPTNeoXModel", mask=False, **W, vocab_size=100),
    "hf_bloom": _hf_text("BloomConfig", "BloomModel", mask=False, hidden_size=32, n_layer=2, n_head=4, vocab_size=100),
    "timm_swin": _timm("swin_tiny_patch4_window7_224", patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                       num_heads=(2, 4)),
    "timm_cait": _timm("cait_xxs24_224", patch_size=8, depth=2, embed_dim=32, num_heads=4),
    "timm_xcit": _timm("xcit_nano_12_p16_224", patch_size=8, depth=2, embed_dim=32, num_heads=4),
    "torchvision_swin": _torchvision_swin,
    "torch_encoder_norm_first": _torch_encoder_norm_first,
}


@torch.no_grad()
def randomise_constants(model: nn.Module, seed: int = 0) -> None:
    """Give every constant-valued tensor (zero bias, unit norm weight, tiny layer scale) random values."""
    g = torch.Generator().manual_seed(seed)
    for _, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if not tensor.is_floating_point() or tensor.numel() < 2:
            continue
        flat = tensor.detach().flatten()
        if bool((flat == flat[0]).all()):
            tensor.copy_(flat[0] + 0.1 * torch.randn(tensor.shape, generator=g).to(tensor.dtype) + 0.05)


def build(name: str, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, run = ZOO[name]()
        randomise_constants(model, seed)
    return model, run
