"""The tslearn rows of `unimm bench align` for two checkouts, in alternation (a noisy machine
drifts: alternating rounds compare like with like):

    git worktree add /tmp/before 3da0e71
    python scripts/gak_side_by_side.py /tmp/before . --rounds 3

Each round runs `unimm.commands.bench._bench_tslearn` (256 views × 16 slices, 64-d and 768-d,
float64 and float32, against tslearn's `cdist_gak`) in a fresh process per checkout and prints
one JSON line per checkout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CODE = """
import json
from unimm.commands.bench import _bench_tslearn
from unimm.utils import bench_timer
keys = ("features", "dtype", "forward_s", "tslearn_s", "speedup_vs_tslearn", "max_rel_diff_vs_tslearn")
print(json.dumps([{k: r[k] for k in keys} for r in _bench_tslearn(bench_timer("cpu"))]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", help="repository folders to compare")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for root in args.checkouts:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(root)}
            out = subprocess.run(
                [sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True
            )
            print(root, out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
