"""python jobs/materialize.py --config jobs/presets/materialize_demo.yaml [key.sub=value ...]

The same file runs locally and under `ray job submit --working-dir . -- python jobs/materialize.py
...`.
"""

import sys

from react_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["materialize", *sys.argv[1:]]))
