"""Stage 1: image-text shards -> image and caption embeddings (see ``pipeline.run_embedding``)."""
