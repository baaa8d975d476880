"""bench.time_to_accuracy's arithmetic: the target, the first epoch that reaches it, the table."""
import pytest

from bench import time_to_accuracy as tta


def _run(metric: str, values: list[float], seconds_per_epoch: float, ratio: float = 1.0) -> dict:
    history = [{"epoch": i + 1, metric: v, "train_seconds": seconds_per_epoch * (i + 1)} for i, v in enumerate(values)]
    return {"final": {metric: values[-1]}, "history": history, "ratio": ratio}


def test_time_to_target_is_the_first_epoch_that_reaches_it():
    hist = _run("test_accuracy", [0.5, 0.9, 0.8, 0.95], 2.0)["history"]
    assert tta.time_to_target(hist, "test_accuracy", 0.9, True) == 4.0
    assert tta.time_to_target(hist, "test_accuracy", 0.96, True) is None
    ppl = _run("test_perplexity", [9.0, 6.0, 5.0], 1.5)["history"]
    assert tta.time_to_target(ppl, "test_perplexity", 6.0, False) == 3.0


def test_summary_targets_the_uncompressed_final_metric():
    runs = {"none": _run("test_accuracy", [0.6, 0.8, 0.9], 10.0),
            "topk": _run("test_accuracy", [0.5, 0.85, 0.91], 2.0, ratio=40.0),
            "onebit": _run("test_accuracy", [0.4, 0.6, 0.7], 3.0, ratio=20.0)}
    rows, table = tta.summarize(runs)
    by = {r["method"]: r for r in rows}
    assert by["none"]["time_to_target_s"] == 30.0 and by["none"]["speedup_to_target"] == 1.0
    assert by["topk"]["time_to_target_s"] == 6.0 and by["topk"]["speedup_to_target"] == 5.0
    assert by["onebit"]["time_to_target_s"] is None and "not reached" in table
    # within one point of 0.9: none at 30 s, top-k at 6 s (0.91), 1-bit never (0.7)
    assert by["none"]["time_to_bound_s"] == 30.0 and by["topk"]["speedup_to_bound"] == 5.0
    assert by["onebit"]["time_to_bound_s"] is None
    assert "0.9000" in table.splitlines()[0] and "0.8900" in table.splitlines()[0]


def test_bound_targets_follow_the_comparison():
    assert tta.bound_target(0.98, True) == pytest.approx(0.97)
    assert tta.bound_target(10.0, False) == pytest.approx(10.3)


def test_summary_needs_the_uncompressed_run():
    with pytest.raises(ValueError, match="uncompressed"):
        tta.summarize({"topk": _run("test_accuracy", [0.5], 1.0)})


def test_plan_puts_the_baseline_first_once():
    args = tta.parse_args(["--methods", "topk", "none", "auto", "--epochs", "3"])
    runs = tta.plan(args, tta.Path("/tmp/x"))
    assert [r[r.index("--compression") + 1] for r in runs] == ["none", "topk", "auto"]
    assert all("--epochs" in r and r[r.index("--epochs") + 1] == "3" for r in runs)
