"""Stage 3: a task given by class names -> retrieved training pairs (see ``retrieval.run_retrieval``)."""
