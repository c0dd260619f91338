"""Stage 3: a task given by class names -> retrieved training pairs (the job is
``react_ray.jobs.retrieve``); their materialization into training shards."""
