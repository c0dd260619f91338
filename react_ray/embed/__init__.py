"""Stage 1: image-text shards -> image and caption embeddings (wiring in ``pipeline``; the job
is ``react_ray.jobs.embed``)."""
