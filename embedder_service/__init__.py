"""The embedder service: CLIP text and image encoders over gRPC."""
