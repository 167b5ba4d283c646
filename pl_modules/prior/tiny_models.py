"""Small random-initialised models built from config dicts and saved with ``save_pretrained``, so
tests and CPU presets load them back through the very ``from_pretrained`` path real weights take.
Untrained, their outputs mean nothing: tiny-sd and tiny-clip exercise real code paths without
downloads; tiny-pixel is small enough to be trained from scratch on a CPU (prior.train_unet=true).
presets.py names them; trained_presets.py trains small ones on first use."""
from __future__ import annotations

from pathlib import Path

def save_tiny_clip(folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A CLIP with a 2-layer text and vision tower and a character-level BPE tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    # projection_dim inside each tower too: CLIPVisionModelWithProjection reads the vision config alone.
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
    specials = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                    pad_token_id=vocab["<|endoftext|>"])
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, **specials, **tower),
                        vision_config=dict(image_size=image_size, patch_size=8, **tower), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def tiny_clip_tokenizer():
    """A character-level byte-BPE CLIP tokenizer (no merges) over the 256 byte symbols."""
    from transformers import CLIPTokenizer

    chars = _byte_symbols()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for the bytes 0–255 (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def save_tiny_pixel_diffusion(folder: str | Path, cross_attention_dim: int = 32, seed: int = 0) -> Path:
    """A pixel-space prior (unet/, scheduler/; no vae/): a 1 M-parameter UNet whose attention sits at
    the lowest resolution only and attends to the conditioning tokens alone, so its cost grows
    linearly with the pixel count and whole Kodak images restore on a CPU. It predicts the clean
    image (x0), which few-step DDIM sampling of a small model needs more than epsilon, and its
    conv_out starts at zero, so that with prior.residual it restores from the identity."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=8,
                         block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "DownBlock2D",
                                                                            "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                         cross_attention_dim=cross_attention_dim, attention_head_dim=8,
                         only_cross_attention=True)
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    unet.save_pretrained(folder / "unet")
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, clip_sample_range=1.0,
                  set_alpha_to_one=True, prediction_type="sample").save_pretrained(folder / "scheduler")
    return folder


def save_tiny_diffusion(folder: str | Path, cross_attention_dim: int = 32, seed: int = 0) -> Path:
    """A latent-diffusion folder in diffusers' layout (vae/, unet/, scheduler/, text_encoder/,
    tokenizer/) with Stable
    Diffusion's structure — 8× VAE downsampling, 4 latent channels, cross-attention UNet, SD's
    noise schedule — at a size a CPU trains in seconds."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                  block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256).save_pretrained(folder / "vae")
    UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
                         block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
                         attention_head_dim=8).save_pretrained(folder / "unet")
    save_sd_scheduler(folder)
    save_tiny_text_encoder(folder, cross_attention_dim)
    return folder


def save_sd_scheduler(folder: Path) -> None:
    """Stable Diffusion's noise schedule and DDIM settings, predicting epsilon."""
    from diffusers import DDIMScheduler

    DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  prediction_type="epsilon").save_pretrained(folder / "scheduler")


def save_tiny_text_encoder(folder: Path, hidden_size: int) -> None:
    """A 2-layer CLIP text encoder (text_encoder/) and its character-level tokenizer (tokenizer/)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    vocab = tokenizer.get_vocab()
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                 bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                 pad_token_id=vocab["<|endoftext|>"])).save_pretrained(folder / "text_encoder")


# A chat template for the tiny VLM: role, then the content items in order, images as <image>.
TINY_VLM_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {% for item in message['content'] %}"
                     "{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}{% endif %}{% endfor %}\n"
                     "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def save_tiny_vlm(folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A LLaVA-structured multi-image VLM (CLIP vision tower, projector, 2-layer Llama) with a
    processor and a chat template, loadable through AutoModelForImageTextToText and AutoProcessor
    exactly as a real one (Qwen2-VL, SmolVLM, LLaVA-OneVision, …) is. Random: its answers mean
    nothing; it exercises the judge's real path offline."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.model_max_length = 1024  # three images' tokens and a prompt
    vocab = tokenizer.get_vocab()
    patch = 8
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                       pad_token_id=vocab["<|endoftext|>"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                         image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-1)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=TINY_VLM_TEMPLATE).save_pretrained(folder)
    return folder
