"""Stage 4: REACT customization (and base pre-training) on Ray Train."""
