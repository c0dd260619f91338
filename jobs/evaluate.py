"""python jobs/evaluate.py --config jobs/presets/evaluate_demo.yaml [key.sub=value ...]

The same file runs locally and under `ray job submit --working-dir . -- python jobs/evaluate.py
...`.
"""

import sys

from react_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
