"""The search service: a Milvus collection of CLIP image vectors over gRPC."""
