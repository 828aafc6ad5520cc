"""Write a CLIP ViT-B/32 checkpoint with random weights, for speed tests:
vision width 768, patch 32, 224 px, 12 layers; text width 512, 12 layers;
projection 512. Tokenizer files come from the bundled test model (a real
CLIP BPE tokenizer, smaller vocabulary)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

TEST_MODEL = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "shapes-clip"


def write(out: Path, tokenizer_from: Path = TEST_MODEL) -> Path:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                         num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                           num_hidden_layers=12, image_size=224, patch_size=32),
        projection_dim=512)
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessor().save_pretrained(out)  # OpenAI CLIP's 224 px settings
    for name in tokenizer_from.iterdir():
        if name.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            shutil.copy(name, out / name.name)
    return out


def write_tiny(out: Path, projection_dim: int = 512, tokenizer_from: Path = TEST_MODEL) -> Path:
    """A CLIP as cheap as the bundled test model (64 px, two narrow layers
    per tower) whose vectors are `projection_dim` wide, as ViT-B/32's 512:
    for measuring what the search service does per vector on a CPU."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                         num_hidden_layers=2, max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                           num_hidden_layers=2, image_size=64, patch_size=16),
        projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
                       ).save_pretrained(out)
    for name in tokenizer_from.iterdir():
        if name.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            shutil.copy(name, out / name.name)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    print(write(parser.parse_args().out))
