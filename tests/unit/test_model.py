"""The embedder's model path against plain transformers, on the bundled checkpoint."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

from embedder_service.checkpoint import ModelLoadError
from embedder_service.model import ClipEncoder
from embedder_service.preprocess import decode_image
from tests.services import ROOT, TEST_MODEL

PHOTOS = sorted((ROOT / "tests" / "fixtures" / "photos").glob("*.jpg"))


@pytest.fixture(scope="module")
def encoder():
    return ClipEncoder(str(TEST_MODEL), device="cpu")


@pytest.fixture(scope="module")
def reference():
    return CLIPModel.from_pretrained(TEST_MODEL).eval()


def _unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x, dim=-1).numpy()


def test_image_vectors_match_transformers(encoder, reference):
    processor = CLIPImageProcessorPil.from_pretrained(TEST_MODEL)
    images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in PHOTOS]
    with torch.inference_mode():
        expected = _unit(reference.get_image_features(
            **processor(images=images, return_tensors="pt")).pooler_output)
    crops = np.stack([encoder.preprocessor.crop(decode_image(p.read_bytes())) for p in PHOTOS])
    np.testing.assert_allclose(encoder.encode_images([crops]), expected, atol=1e-5)


def test_text_vectors_match_transformers_and_are_normalised(encoder, reference):
    texts = ["a photo of a red circle", "a white dog", "一只白色的狗", "🐕"]
    tokenizer = AutoTokenizer.from_pretrained(TEST_MODEL)
    with torch.inference_mode():
        expected = _unit(reference.get_text_features(
            **tokenizer(texts, padding=True, return_tensors="pt")).pooler_output)
    vectors = encoder.encode_texts(texts)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_texts_longer_than_the_context_are_truncated(encoder):
    """Words past the model's context change nothing: they were cut off."""
    long = "a photo of a red circle " * 40
    assert len(encoder.tokenizer(long)["input_ids"]) > encoder.max_text_tokens
    a, b = encoder.encode_texts([long, long + " on a blue square background"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_batches_larger_than_a_forward_pass(encoder):
    small = ClipEncoder(str(TEST_MODEL), device="cpu", batch_size=3)
    texts = [f"a photo of {n} circles" for n in range(8)]
    np.testing.assert_allclose(small.encode_texts(texts), encoder.encode_texts(texts), atol=1e-5)


def test_info_and_fingerprint(encoder):
    info = encoder.info
    assert (info.device, info.dtype, info.dim) == ("cpu", "float32", encoder.model.config.projection_dim)
    assert len(info.fingerprint) == 16
    # bfloat16 weights are still the same weights: same fingerprint.
    assert ClipEncoder(str(TEST_MODEL), device="cpu", dtype="bfloat16").info.fingerprint == info.fingerprint


def test_half_precision_agrees_with_float32(encoder):
    """The numerics bar for reduced precision (cosine >= 0.999), on a CPU path."""
    half = ClipEncoder(str(TEST_MODEL), device="cpu", dtype="float16")
    crops = np.stack([encoder.preprocessor.crop(decode_image(p.read_bytes())) for p in PHOTOS])
    cosines = (half.encode_images([crops]) * encoder.encode_images([crops])).sum(axis=1)
    assert cosines.min() >= 0.999, cosines


@pytest.mark.parametrize("config", [None, "{}"], ids=["no-config", "config-without-weights"])
def test_unloadable_model_says_what_to_do(tmp_path, config):
    """Refused before transformers is asked (no config.json), or by it."""
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match=r"cannot load CLIP checkpoint[^\n]*\nWhat to do"):
        ClipEncoder(str(tmp_path), device="cpu")


def test_directory_with_a_revision_is_refused():
    with pytest.raises(ModelLoadError, match="applies to hub ids"):
        ClipEncoder(str(TEST_MODEL), device="cpu", revision="0123abcd")


def _fingerprints_from_cache(hf_home, *revisions: str) -> subprocess.CompletedProcess:
    """ClipEncoder on a hub id at each revision, offline, in one process of
    its own (the hub library reads HF_HOME and HF_HUB_OFFLINE once, at
    import): a fingerprint per line, or the error that stopped it."""
    code = ("import sys; from embedder_service.model import ClipEncoder\n"
            "for revision in sys.argv[1:]:\n"
            "    print(ClipEncoder('imagesearch/shapes-clip', device='cpu',\n"
            "                      revision=revision).info.fingerprint, flush=True)")
    return subprocess.run([sys.executable, "-c", code, *revisions], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})


def test_hub_revision_loads_that_commit_and_no_other(tmp_path, encoder):
    # A Hugging Face cache laid out as a download leaves it: one snapshot
    # named by its commit, which refs/main points at.
    commit = "a" * 40
    repo = tmp_path / "hub" / "models--imagesearch--shapes-clip"
    shutil.copytree(TEST_MODEL, repo / "snapshots" / commit,
                    ignore=shutil.ignore_patterns("README.md"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    run = _fingerprints_from_cache(tmp_path, commit, "b" * 40)
    assert run.returncode != 0  # the second revision is not there
    assert run.stdout.split() == [encoder.info.fingerprint]  # the first loaded
    assert f"at revision {'b' * 40}" in run.stderr, run.stderr[-2000:]


def test_a_home_relative_directory_loads(tmp_path, monkeypatch):
    """"~/m", as an env file passes it unexpanded, is the directory it names."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(TEST_MODEL, tmp_path / "m")
    assert ClipEncoder("~/m", device="cpu").info.name == "m"
