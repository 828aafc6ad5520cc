#!/usr/bin/env python
"""Train the tiny offline CLIP used by the tests ("shapes-clip").

Why: the tests must exercise the real CLIP code path (tokenizer, image
processor, CLIPModel, save/load) without network access, and must be able to
check that search results are *right*. This script trains a very small
transformers ``CLIPModel`` on the synthetic coloured-shapes images from
``imagesearch.synthetic`` and writes a standard Hugging Face checkpoint
directory (``save_pretrained``) that ``CLIPModel`` / ``CLIPProcessor`` /
``AutoTokenizer`` load like any CLIP checkpoint.

Seeds: training images come from ``--data-seed`` (default 1000) only.
Evaluation uses seeds 1..999 (see ``tools/eval_test_model.py``), which are
never trained on.

The tokenizer is a real CLIP byte-level BPE built offline: vocab.json holds
the 256 byte symbols, the same with ``</w>``, merges that build every caption
word into one token, and the two special tokens. Any text still tokenizes
(unknown words fall back to byte symbols).

Runs in a couple of minutes on 2 CPU cores and is deterministic for a given
``--seed`` and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from imagesearch import synthetic  # noqa: E402

from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
)

IMAGE_SIZE = 64
MAX_TEXT_LEN = 32
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EVAL_SEEDS = range(1, 1000)  # synthetic seeds kept out of training


# --------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE on one word, as CLIP does it: repeatedly merge the best-ranked pair."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, _ = min(pairs)
        if rank == math.inf:
            break
        first = next(i for r, i in pairs if r == rank)
        a, b = symbols[first], symbols[first + 1]
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == a and symbols[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-format vocab and merges in which each of ``words`` is a single token.

    Merges are appended only as needed (and always with the lowest priority),
    so adding one word never changes how an earlier word tokenizes.
    """
    byte_map = bytes_to_unicode()
    byte_syms = list(byte_map.values())
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        start = [byte_map[b] for b in word.encode("utf-8")]
        start[-1] += "</w>"
        while len(pieces := _bpe(start, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    tokens = byte_syms + [s + "</w>" for s in byte_syms] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def build_tokenizer(workdir: Path) -> CLIPTokenizer:
    """Write vocab.json/merges.txt for the caption words into ``workdir`` and load them.

    They stay in the checkpoint next to tokenizer.json (which transformers v5
    writes on its own), so older transformers and other CLIP BPE readers work too.
    """
    words = sorted({w for label in synthetic.LABELS for w in synthetic.caption(label).split()})
    vocab, merges = build_vocab(words)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (workdir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    # Load back from the files, which also checks they are in CLIP's format.
    tok = CLIPTokenizer(
        vocab=str(workdir / "vocab.json"), merges=str(workdir / "merges.txt"), model_max_length=MAX_TEXT_LEN
    )
    for w in words:  # each caption word must be exactly one token
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert ids == [vocab[w + "</w>"]], (w, ids)
    return tok


# --------------------------------------------------------------------------- data / model


def image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )


def load_images(seed: int, per_label: int, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate a synthetic set (via real JPEG files) and preprocess it like inference does."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic.generate(tmp, seed=seed, per_label=per_label)
        labels = torch.tensor([synthetic.LABELS.index(p.parent.name) for p in paths])
        chunks = []
        for i in range(0, len(paths), 256):
            imgs = [Image.open(p) for p in paths[i : i + 256]]
            chunks.append(processor(images=imgs, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks), labels


def build_model(tok: CLIPTokenizer, seed: int) -> CLIPModel:
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TEXT_LEN,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            image_size=IMAGE_SIZE,
            patch_size=8,
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
        projection_dim=64,
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


def dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip + multiple-of-90-degree rotation per image: a circle, square or
    triangle keeps its label under all of them, so this multiplies the data 8x for free."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    k = torch.randint(0, 4, (len(x),), generator=gen)
    out = x.clone()
    for r in (1, 2, 3):
        m = k == r
        if m.any():
            out[m] = torch.rot90(x[m], r, dims=(-2, -1))
    return out


def features(out) -> torch.Tensor:
    """get_*_features returns a tensor in transformers v4 and an output object in v5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# --------------------------------------------------------------------------- training


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    t0 = time.time()

    tok = build_tokenizer(out)  # writes out/vocab.json and out/merges.txt
    proc = image_processor()
    model = build_model(tok, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params, vocab {len(tok)}", flush=True)

    pixels, labels = load_images(args.data_seed, args.per_label, proc)
    print(f"data: {len(labels)} images (seed {args.data_seed}) in {time.time() - t0:.1f}s", flush=True)
    captions = [synthetic.caption(label) for label in synthetic.LABELS]
    # Pad only to the longest caption: with CLIP's causal mask, positions after EOS
    # never reach the pooled output, so padding to 32 would only cost time.
    text = tok(captions, padding=True, truncation=True, return_tensors="pt")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))),
    )
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    order = torch.randperm(len(labels), generator=gen)
    pos = 0
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(labels), generator=gen), 0
        idx = order[pos : pos + args.batch_size]
        pos += args.batch_size
        x = pixels[idx]
        if args.augment:
            x = dihedral(x, gen)
        y = labels[idx]

        img = F.normalize(features(model.get_image_features(pixel_values=x)), dim=-1)
        txt = F.normalize(features(model.get_text_features(**text)), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.T  # (batch, 24 labels)
        # Image -> all 24 captions: no false negatives, since captions are per label.
        loss_i = F.cross_entropy(logits, y)
        # Caption -> images in the batch, every image of that label a positive.
        pos_mask = F.one_hot(y, len(captions)).T.float()
        present = pos_mask.sum(1) > 0
        target = pos_mask[present] / pos_mask[present].sum(1, keepdim=True)
        loss_t = -(target * F.log_softmax(logits.T[present], dim=-1)).sum(1).mean()
        loss = 0.5 * (loss_i + loss_t)

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps:
            acc = (logits.argmax(1) == y).float().mean().item()
            print(
                f"step {step:5d}/{args.steps}  loss {loss.item():.4f}  batch acc {acc:.3f}  "
                f"scale {scale.item():.1f}  {time.time() - t0:.0f}s",
                flush=True,
            )

    model.eval()
    with torch.no_grad():
        txt = F.normalize(features(model.get_text_features(**text)), dim=-1)
        correct = 0
        for i in range(0, len(labels), 512):
            img = F.normalize(features(model.get_image_features(pixel_values=pixels[i : i + 512])), dim=-1)
            correct += ((img @ txt.T).argmax(1) == labels[i : i + 512]).sum().item()
    print(f"final training accuracy (image -> caption over {len(captions)} labels): {correct / len(labels):.4f}")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    proc.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"saved to {out} ({size / 1e6:.2f} MB) in {time.time() - t0:.0f}s total")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "tests/fixtures/shapes-clip"), help="checkpoint directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="torch seed for init and batching (default: 0)")
    p.add_argument("--data-seed", type=int, default=1000, help="synthetic training-set seed; eval uses 1..999 (default: 1000)")
    p.add_argument("--per-label", type=int, default=200, help="training images per label (default: 200)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: 1500)")
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True, help="random flips and 90-degree rotations")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    if EVAL_SEEDS[0] <= args.data_seed <= EVAL_SEEDS[-1]:
        p.error(f"--data-seed {args.data_seed} is reserved for evaluation (seeds {EVAL_SEEDS[0]}..{EVAL_SEEDS[-1]})")
    train(args)


if __name__ == "__main__":
    main()
