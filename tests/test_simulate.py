"""launch.simulate's in-process runs and launch.compare's convergence check (single process;
the bit-identity with real Gloo ranks is launch.compare's spot check and
tests/test_inprocess_identity.py)."""
from __future__ import annotations

from launch.compare import DGC_WARMUP_SHARE, INPROCESS_METHODS, converged
from launch.simulate import train_inprocess
from launch.summarize import summarize


def test_record_feeds_the_table_and_recipe_is_applied():
    rec = train_inprocess("digits-cnn", "dgc", {"ratio": 0.01, "warmup_steps": 2}, 0, 2, 4, 2)
    assert [h["step"] for h in rec["history"]] == [2, 4]
    assert rec["parameters_identical_on_all_ranks"] and rec["optimizer_momentum"] == 0.0
    assert rec["compression"]["momentum"] == 0.9  # SGD's momentum moved into DGC
    assert "dgc" in summarize([rec])


def test_every_compressor_is_compared_with_both_paper_densities():
    names = {n for n, _ in INPROCESS_METHODS}
    assert names == {"none", "fp16", "bf16", "adacomp", "terngrad", "dgc", "onebit", "topk", "randomk", "scalecom"}
    for sparse in ("topk", "randomk", "scalecom"):
        assert sorted(p["ratio"] for n, p in INPROCESS_METHODS if n == sparse) == [0.001, 0.01]
    assert 0 < DGC_WARMUP_SHARE < 1


def _rec(values, key="test_perplexity"):
    hist = [{"step": 10 * (i + 1), key: v} for i, v in enumerate(values)]
    return {"history": hist, "final_test_perplexity": values[-1] if key == "test_perplexity" else None}


def test_converged_reads_the_last_quarter():
    assert converged(_rec([50, 20, 10.1, 10.05, 10.0]))["converged"]  # 0.5 % over the last quarter
    c = converged(_rec([50, 30, 20, 15]))
    assert not c["converged"] and abs(c["change"] - 0.25) < 1e-9
    assert converged(_rec([0.5, 0.9, 0.95, 0.952], "test_accuracy"))["converged"]
