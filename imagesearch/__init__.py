"""Client side of the image search system: wire stubs (imagesearch.v1), a
typed client and the `imgsearch` CLI. Installs without torch or Milvus."""
