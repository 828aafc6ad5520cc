"""Loading a CLIP checkpoint and running its two encoders.

Any CLIP checkpoint loads through transformers `from_pretrained`, a hub id or
a local directory alike; the test model in tests/fixtures loads the same way.
A checkpoint that cannot be loaded is a start-up error (`ModelLoadError`):
the service never falls back to some other model.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoTokenizer, CLIPModel

from embedder_service.checkpoint import ModelLoadError, locate, public_name
from embedder_service.preprocess import Preprocessor
from embedder_service.text_graphs import TextGraphs

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    dim: int
    device: str
    dtype: str
    fingerprint: str
    max_text_tokens: int


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """`auto` picks CUDA with float16 when present, else CPU with float32."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} asked for CUDA but torch sees no GPU; "
                             "use --device cpu or auto")
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    return dev, _DTYPES[dtype]


def weights_fingerprint(model: CLIPModel) -> str:
    """A short digest of both projections, taken in float32 so that the same
    weights give the same fingerprint on any device or dtype."""
    digest = hashlib.sha256()
    for weight in (model.text_projection.weight, model.visual_projection.weight):
        digest.update(weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _features(output: torch.Tensor | object) -> torch.Tensor:
    # transformers 4.x returns the projected tensor; 5.x a ModelOutput whose
    # pooler_output is the projected tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEncoder:
    """A CLIP model on one device: texts and preprocessed image crops in,
    L2-normalised float32 vectors out. `encode_texts` and `encode_images` may
    run at once on two threads (they share only read-only weights), but
    each from one thread at a time.
    On CUDA, texts run through captured graphs (text_graphs.py) unless
    `cuda_graphs` is off or capturing fails."""

    def __init__(self, name: str, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 64, cuda_graphs: bool = True, revision: str = "",
                 hub: dict | None = None) -> None:
        """`hub`: `checkpoint.locate(name, revision)`, when the caller has it already."""
        self.device, self.dtype = resolve_device(device, dtype)
        self.batch_size = batch_size
        started = time.perf_counter()
        hub = hub if hub is not None else locate(name, revision)
        name = os.path.expanduser(name)  # as locate checked it: "~/m" from an env file is a path
        try:
            model = CLIPModel.from_pretrained(name, dtype=torch.float32, **hub)
            self.tokenizer = AutoTokenizer.from_pretrained(name, **hub)
            self.preprocessor = Preprocessor.from_pretrained(name, **hub)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"cannot load CLIP checkpoint {name!r}"
                f"{f' at revision {revision}' if revision else ''}: {exc}\n"
                "What to do: pass --model (or EMBEDDER_MODEL) a local directory written by "
                "CLIPModel.save_pretrained with its tokenizer and preprocessor_config.json, or a "
                "hub id this machine can download; on an offline machine, fill the Hugging Face "
                "cache first and set HF_HUB_OFFLINE=1.") from exc
        fingerprint = weights_fingerprint(model)
        self.model = model.to(self.device, self.dtype).eval()
        self._lut = torch.from_numpy(self.preprocessor.lut).to(self.device)
        self.max_text_tokens = int(model.config.text_config.max_position_embeddings)
        # No token spans more than a few dozen characters, so longer texts can
        # be cut before tokenizing: a 1 MB text costs no more than a short one.
        self.max_text_chars = 64 * self.max_text_tokens
        self.info = ModelInfo(name=public_name(name), dim=int(model.config.projection_dim),
                              device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
                              fingerprint=fingerprint, max_text_tokens=self.max_text_tokens)
        self.text_graphs = self._capture_text_graphs() if cuda_graphs else None
        self.load_seconds = time.perf_counter() - started
        log.info("loaded %s in %.1f s: dim %d on %s/%s, fingerprint %s", name, self.load_seconds,
                 self.info.dim, self.info.device, self.info.dtype, fingerprint)

    def _text_vectors(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Normalised vectors of padded ids with no attention mask (see text_graphs.py)."""
        features = _features(self.model.get_text_features(input_ids=input_ids)).float()
        return torch.nn.functional.normalize(features, dim=-1)

    def _capture_text_graphs(self) -> TextGraphs | None:
        if self.device.type != "cuda":
            return None
        if self.tokenizer.padding_side != "right":  # the graphs pad after the end-of-text token
            log.warning("tokenizer pads on the %s: texts run eagerly, without CUDA graphs",
                        self.tokenizer.padding_side)
            return None
        pad_id = self.tokenizer.pad_token_id
        try:
            return TextGraphs(self._text_vectors, device=self.device, max_batch=self.batch_size,
                              max_tokens=self.max_text_tokens,
                              pad_id=self.tokenizer.eos_token_id if pad_id is None else pad_id)
        except Exception as exc:  # noqa: BLE001 - e.g. a transformers version that syncs mid-forward
            log.warning("text CUDA graphs could not be captured (%s: %s); texts run eagerly",
                        type(exc).__name__, exc)
            return None

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) vectors; texts past the context are truncated."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [text[:self.max_text_chars] for text in texts[start:start + self.batch_size]]
            tokens = self.tokenizer(chunk, padding=True,
                                    truncation=True, max_length=self.max_text_tokens,
                                    return_tensors="pt")
            if self.text_graphs is not None:
                chunks.append(self.text_graphs.run(tokens["input_ids"]))
                continue
            tokens = tokens.to(self.device)
            chunks.append(self._normalised(_features(self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))))
        return np.concatenate(chunks)

    def _on_device(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, np.ndarray):  # (N, H, W, 3) from the CPU workers
            return torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2)
        if crops.is_cuda:  # made on a decoder thread's stream: keep its memory until we are done
            crops.record_stream(torch.cuda.current_stream(crops.device))
        return crops

    @torch.inference_mode()
    def encode_images(self, parts: list[np.ndarray | torch.Tensor]) -> np.ndarray:
        """(N, dim) vectors from uint8 crops, in order: (n, H, W, 3) arrays made
        by `preprocessor.crop` or (n, 3, H, W) device tensors made by
        device_images.py. Rescale and normalise happen here, on the device,
        through the preprocessor's own lookup table: the same float32 values
        as on the CPU."""
        crops = torch.cat([self._on_device(part) for part in parts])
        chunks = []
        for start in range(0, len(crops), self.batch_size):
            raw = crops[start:start + self.batch_size].long()
            pixels = torch.stack([self._lut[c][raw[:, c]] for c in range(3)], dim=1)
            features = self.model.get_image_features(pixel_values=pixels.to(self.dtype))
            chunks.append(self._normalised(_features(features)))
        return np.concatenate(chunks)

    @staticmethod
    def _normalised(features: torch.Tensor) -> np.ndarray:
        features = features.float()
        return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()
