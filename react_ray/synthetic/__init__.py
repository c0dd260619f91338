"""Generated data for the demo, tests and benchmarks: a LAION-style corpus, clustered embedding
sets."""
