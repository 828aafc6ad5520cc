"""The original tutorial's loop, as the baseline every headline figure is a
ratio against: one image at a time through the checkpoint's processor and
`get_image_features`, all rows inserted into Milvus Lite at the end."""
from __future__ import annotations

import io
import time

import numpy as np
import torch
from PIL import Image
from pymilvus import MilvusClient
from transformers import AutoImageProcessor, CLIPModel


def naive_loop(model_dir: str, jpegs: list[bytes], device: str, dtype: torch.dtype,
               milvus_path: str) -> dict:
    model = CLIPModel.from_pretrained(model_dir).to(device, dtype).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    warm = processor(images=Image.new("RGB", (64, 64)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        model.get_image_features(pixel_values=warm.to(device, dtype))
    started = time.perf_counter()
    vectors = []
    for data in jpegs:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        pixels = processor(images=image, return_tensors="pt")["pixel_values"].to(device, dtype)
        with torch.no_grad():
            out = model.get_image_features(pixel_values=pixels)
        features = (out if isinstance(out, torch.Tensor) else out.pooler_output).float()
        vectors.append((features / features.norm(dim=-1, keepdim=True)).cpu().numpy()[0])
    encoded = time.perf_counter()
    client = MilvusClient(milvus_path)
    client.create_collection("naive", dimension=len(vectors[0]), metric_type="COSINE")
    client.insert("naive", [{"id": i, "vector": v.tolist()} for i, v in enumerate(vectors)])
    done = time.perf_counter()
    client.close()
    return {"images": len(jpegs), "processor": type(processor).__name__, "encode_s": round(encoded - started, 3),
            "insert_s": round(done - encoded, 3),
            "images_per_s": round(len(jpegs) / (done - started), 1),
            "vectors": np.stack(vectors)}
