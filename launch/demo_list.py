"""The demo's plan for ``launch.run_many``: one ``launch.train`` run per compressor.

    python -m launch.demo_list EPOCHS OUT [NAME ...] > plan.json

Without names, every registered compressor (``none`` first, the baseline). Each run writes
its record to ``OUT/NAME.json``.
"""
import json
import os
import sys

from hvdcomp.registry import COMPRESSORS


def plan(epochs: int, out: str, names: list[str]) -> list[list[str]]:
    """``launch.train`` argument lists, one per compressor name (all registered if none)."""
    return [["--compression", name, "--epochs", str(epochs), "--json", os.path.join(out, f"{name}.json")]
            for name in names or list(COMPRESSORS)]


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.split("\n\n")[1].strip())
    json.dump(plan(int(sys.argv[1]), sys.argv[2], sys.argv[3:]), sys.stdout)
