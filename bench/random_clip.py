"""Write CLIP checkpoints with random weights, for speed tests. `write`: the
shape of ViT-B/32 (vision width 768, patch 32, 224 px, 12 layers; text width
512, 12 layers; projection 512). `write_tiny`: as cheap as the bundled test
model, with vectors as wide as asked. Tokenizer files come from the bundled
test model (a real CLIP BPE tokenizer, smaller vocabulary)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

TEST_MODEL = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "shapes-clip"


def _tower(width: int, layers: int, heads: int, mlp: int, **extra) -> dict:
    return dict(hidden_size=width, intermediate_size=mlp * width, num_attention_heads=heads,
                num_hidden_layers=layers, **extra)


def _save(out: Path, text: dict, vision: dict, projection_dim: int,
          processor: CLIPImageProcessor, tokenizer_from: Path) -> Path:
    torch.manual_seed(0)
    text.update(max_position_embeddings=77, vocab_size=49408)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision,
                         projection_dim=projection_dim)).save_pretrained(out)
    processor.save_pretrained(out)
    for name in tokenizer_from.iterdir():
        if name.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            shutil.copy(name, out / name.name)
    return out


def write(out: Path, tokenizer_from: Path = TEST_MODEL) -> Path:
    return _save(out, _tower(512, 12, 8, 4), _tower(768, 12, 12, 4, image_size=224, patch_size=32),
                 512, CLIPImageProcessor(), tokenizer_from)  # OpenAI CLIP's 224 px settings


def write_tiny(out: Path, projection_dim: int = 512, tokenizer_from: Path = TEST_MODEL) -> Path:
    """A CLIP as cheap as the bundled test model (64 px, two narrow layers
    per tower) whose vectors are `projection_dim` wide, as ViT-B/32's 512:
    for measuring what the search service does per vector on a CPU."""
    return _save(out, _tower(64, 2, 2, 2), _tower(64, 2, 2, 2, image_size=64, patch_size=16),
                 projection_dim, CLIPImageProcessor(size={"shortest_edge": 64},
                                                    crop_size={"height": 64, "width": 64}),
                 tokenizer_from)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    print(write(parser.parse_args().out))
