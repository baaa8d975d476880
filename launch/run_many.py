"""Several ``launch.train`` runs in one ``horovodrun`` launch, one after the other.

    horovodrun -np 4 -H localhost:4 --gloo python -m launch.run_many plan.json

``plan.json`` holds a list of ``launch.train`` argument lists. Starting N ranks costs more
than a short run itself on a small machine (every rank imports torch and Horovod connects
them), so ``launch.compare`` pays that once per task and seed instead of once per method.
Each run is the same as its own launch: ``launch.train.main`` seeds torch and builds the
task, model and optimizer afresh, and writes its own ``--json`` record.
"""
from __future__ import annotations

import json
import sys

from . import train


def main(argv=None) -> list[dict]:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m launch.run_many PLAN.json  (a JSON list of launch.train argument lists)")
    with open(args[0]) as f:
        plan = json.load(f)
    if not isinstance(plan, list) or not all(isinstance(a, list) and all(isinstance(s, str) for s in a) for a in plan):
        raise SystemExit(f"{args[0]}: expected a JSON list of argument lists (lists of strings)")
    return [train.main(run) for run in plan]


if __name__ == "__main__":
    main()
