"""Stage 2: a sharded FAISS index from an embedding set, built on Ray; searching it."""
