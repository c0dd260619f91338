"""python jobs/retrieve.py --config jobs/presets/retrieve_demo.yaml [key.sub=value ...]

The same file runs locally and under `ray job submit --working-dir . -- python jobs/retrieve.py
...`.
"""

import sys

from react_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrieve", *sys.argv[1:]]))
