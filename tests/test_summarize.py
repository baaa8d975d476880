"""launch.summarize: the comparison table computes its columns from the run records."""
from __future__ import annotations

from launch.summarize import summarize


def record(name, accuracy, seed, *, cumulative_ratio=1.0, dense=4000, payload=4000):
    row = {"epoch": 1, "loss": 0.1, "test_accuracy": accuracy, "dense_bytes_per_step": dense,
           "payload_bytes_per_step": payload, "sent_bytes_per_step": payload, "received_bytes_per_step": payload}
    return {"task": "digits-cnn", "compression": {"name": name}, "args": {"seed": seed, "param": {}},
            "final_test_accuracy": accuracy, "final_test_perplexity": None, "ratio": cumulative_ratio,
            "ratio_by_kind": {"conv": cumulative_ratio}, "history": [row], "parameters_identical_on_all_ranks": True}


def row_of(table: str, name: str) -> list[str]:
    return next(line.split() for line in table.splitlines()[1:] if line.split()[1] == name)


def test_mean_spread_difference_and_last_step_ratio():
    table = summarize([record("none", 0.90, 0), record("none", 0.94, 1),
                       record("dgc", 0.80, 0, cumulative_ratio=16.0, payload=40),
                       record("dgc", 0.86, 1, cumulative_ratio=16.0, payload=40)])
    none, dgc = row_of(table, "none"), row_of(table, "dgc")
    assert none[4:7] == ["92.00", "4.00", "+0.00%"]
    # mean 83, spread 6, 9 points below the baseline's mean
    assert dgc[4:7] == ["83.00", "6.00", "-9.00%"]
    # cumulative ratio (warm-up included) beside the last step's dense / payload = 4000 / 40
    assert dgc[7:9] == ["16.0x", "100.0x"]


def test_cost_lines_per_task():
    from launch.summarize import cost_lines

    runs = [record("none", 0.9, 0), record("dgc", 0.8, 0)]
    for r, seconds in zip(runs, (10.0, 30.0)):
        r.update(seconds=seconds, ranks=4)
        r["args"]["steps"] = 100
    line = cost_lines(runs)
    assert "100 steps; 100 ms per 4-rank step uncompressed, 200 ms mean over the 2 runs" in line
    assert "slowest dgc 300 ms" in line and "40 run-seconds" in line
    # a comparison of compressors only (no baseline among the records) still reports its costs
    assert "no uncompressed run (ms per 4-rank step), 300 ms mean over the 1 runs" in cost_lines(runs[1:])
