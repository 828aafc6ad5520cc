#!/usr/bin/env python
"""Check the quality of the offline test CLIP ("shapes-clip").

Why: tests rely on the checkpoint actually finding the right images, so this
measures text-to-image retrieval on fresh synthetic images (seeds 1..999,
never used for training): for every label, rank all images by cosine
similarity to "a photo of a <colour> <shape>" and take precision@k.
It loads the checkpoint exactly as a user would (CLIPModel, CLIPProcessor,
AutoTokenizer from the directory, offline).

Exits non-zero if any seed's mean precision@k is below ``--min-precision``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from imagesearch import synthetic  # noqa: E402
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer  # noqa: E402


def features(out) -> torch.Tensor:
    """get_*_features returns a tensor in transformers v4 and an output object in v5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def check_tokenizer(model_dir: str) -> None:
    """The saved BPE must load through every usual entry point and handle any text."""
    max_len = CLIPConfig.from_pretrained(model_dir).text_config.max_position_embeddings
    for cls in (AutoTokenizer, CLIPTokenizer):
        tok = cls.from_pretrained(model_dir)
        assert tok.model_max_length == max_len, (cls.__name__, tok.model_max_length)
        for label in synthetic.LABELS:  # caption words are whole tokens
            ids = tok(synthetic.caption(label))["input_ids"]
            assert len(ids) == 2 + len(synthetic.caption(label).split()), (label, ids)
        for text in ["a white dog", "一只猫 🐱", "Ünïcödé, punctuation!?", "x" * 200]:
            enc = tok(text, padding="max_length", truncation=True, max_length=max_len)
            ids, n = enc["input_ids"], sum(enc["attention_mask"])
            assert len(ids) == max_len and ids[0] == tok.bos_token_id and ids[n - 1] == tok.eos_token_id, (text, ids)
            # unk is <|endoftext|> too: none inside means every byte was covered.
            assert tok.eos_token_id not in ids[1 : n - 1], (text, ids)
            if n < max_len:  # not truncated: round trip (CLIP decodes with a space after every word piece)
                decoded = tok.decode(ids, skip_special_tokens=True)
                assert decoded.replace(" ", "") == text.lower().replace(" ", ""), (text, decoded)
    print(f"tokenizer ok (AutoTokenizer -> {type(AutoTokenizer.from_pretrained(model_dir)).__name__}, max_length {max_len})")


@torch.no_grad()
def precision_at_k(model, processor, seed: int, per_label: int, k: int) -> dict[str, float]:
    """Per-label precision@k of caption -> image retrieval on the set for ``seed``."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic.generate(tmp, seed=seed, per_label=per_label)
        labels = [p.parent.name for p in paths]
        pixels = processor(images=[Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    img = F.normalize(features(model.get_image_features(pixel_values=pixels)), dim=-1)
    captions = [synthetic.caption(label) for label in synthetic.LABELS]
    text = processor(text=captions, padding=True, truncation=True, return_tensors="pt")
    txt = F.normalize(
        features(model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])), dim=-1
    )
    top = (txt @ img.T).topk(k, dim=1).indices
    return {
        label: sum(labels[j] == label for j in top[i].tolist()) / k for i, label in enumerate(synthetic.LABELS)
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "tests/fixtures/shapes-clip"), help="checkpoint directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="eval seeds, 1..999 (default: 1 2 3)")
    p.add_argument("--per-label", type=int, default=10)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--min-precision", type=float, default=0.9)
    p.add_argument("--verbose", action="store_true", help="print per-label precision")
    args = p.parse_args(argv)
    if not all(1 <= s <= 999 for s in args.seeds):
        p.error("eval seeds must be in 1..999; the others may have been used for training")

    check_tokenizer(args.model)
    model = CLIPModel.from_pretrained(args.model).eval()
    processor = CLIPProcessor.from_pretrained(args.model)
    ok = True
    for seed in args.seeds:
        per = precision_at_k(model, processor, seed, args.per_label, args.k)
        mean = sum(per.values()) / len(per)
        worst = min(per, key=per.get)
        print(f"seed {seed}: mean precision@{args.k} = {mean:.4f} (worst {worst} {per[worst]:.2f})")
        if args.verbose:
            for label, v in per.items():
                print(f"  {label:16s} {v:.2f}")
        ok &= mean >= args.min_precision
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
