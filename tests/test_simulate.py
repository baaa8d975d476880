"""launch.simulate's in-process runs and launch.compare's convergence check (single process;
the bit-identity with real Gloo ranks is launch.compare's spot check and
tests/test_inprocess_identity.py)."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from launch.compare import DGC_WARMUP_SHARE, INPROCESS_METHODS, INPROCESS_TASKS, converged, inprocess_specs
from launch.convergence import convergence_notes, gap, gap_table
from launch.jobs import run_all
from launch.simulate import lr_factor, train_inprocess
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
    assert not converged(_rec([50, 20, 10.0, 9.6]))["converged"]  # 4 %: above the 3 % bound
    assert not converged(_rec([0.5, 0.9, 0.93, 0.95], "test_accuracy"))["converged"]  # 2 points


def _named(values, name, key="test_perplexity", seed=0, ratio=None):
    rec = _rec(values, key)
    rec.update(task="t", compression={"name": name}, args={"seed": seed, "param": {} if ratio is None else
                                                            {"ratio": ratio}})
    return rec


def test_gap_table_and_notes_read_means_over_seeds():
    base = [_named([20, 10, 10, 10], "none", seed=s) for s in (0, 1)]
    topk = [_named([40, 20, 11, 10.2], "topk", seed=0, ratio=0.01), _named([40, 20, 11, 10.4], "topk", seed=1,
                                                                            ratio=0.01)]
    table = gap_table(base + topk)
    assert "| topk 0.01 | +100.00 | +100.00 | +10.00 | +3.00 | misses |" in table
    assert gap("test_accuracy", 0.95, 0.97) == pytest.approx(2.0)
    assert "converged" in convergence_notes(base) and "NOT" not in convergence_notes(base)


def test_cosine_schedule_anneals_to_zero():
    assert lr_factor("constant", 7, 10) == 1.0
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert 0 < lr_factor("cosine", 9, 10) < 0.03
    with pytest.raises(ValueError):
        lr_factor("step", 0, 10)


def test_comparison_specs_cover_every_run_with_the_task_shapes():
    args = argparse.Namespace(tasks=list(INPROCESS_TASKS), seeds=[0, 1, 2], methods=None, steps_scale=1.0,
                              out="o", ranks=4)
    specs = inprocess_specs(args)
    assert len(specs) == 117 and len({s["path"] for s in specs}) == 117
    assert specs[0]["task"] == "stdlib-transformer"  # the most expensive task first
    dgc = next(s for s in specs if s["name"] == "dgc" and s["task"] == "stdlib-lstm")
    assert dgc["params"]["warmup_steps"] == int(DGC_WARMUP_SHARE * INPROCESS_TASKS["stdlib-lstm"]["steps"])
    assert {s["schedule"] for s in specs} == {"cosine"}


def _untimed(path):
    rec = json.load(open(path))
    rec.pop("seconds")
    for row in rec["history"]:
        row.pop("seconds")
    return rec


def test_parallel_jobs_give_the_serial_records(tmp_path):
    def specs(out):
        return [{"path": str(out / f"{name}.json"), "task": "digits-cnn", "name": name, "params": params, "seed": 1,
                 "ranks": 2, "steps": 4, "eval_every": 2, "width": 8, "batch_size": 8, "lr": 0.05,
                 "schedule": "cosine"} for name, params in (("none", {}), ("topk", {"ratio": 0.01}))]
    (tmp_path / "serial").mkdir()
    (tmp_path / "parallel").mkdir()
    run_all(specs(tmp_path / "serial"), jobs=1)
    run_all(specs(tmp_path / "parallel"), jobs=2)
    for name in ("none", "topk"):
        serial, parallel = (_untimed(tmp_path / d / f"{name}.json") for d in ("serial", "parallel"))
        assert serial == parallel
        assert not math.isnan(serial["final_test_accuracy"])


def test_an_sgd_task_can_run_under_adamw_and_gets_the_frozen_v_recipe():
    # The Adam study's second task: the LSTM under AdamW (launch.adam_product --task lstm).
    import warnings

    with warnings.catch_warnings(record=True) as notices:
        warnings.simplefilter("always")
        rec = train_inprocess("stdlib-lstm", "onebit", {}, 0, 2, 3, 3, width=16, seq=8, batch_size=4,
                              eval_chars=256, optimizer="adamw", warmup_steps=1, lr=1e-3)
    assert rec["parameters_identical_on_all_ranks"] and rec["args"]["optimizer"] == "adamw"
    assert any("FrozenAdamW" in str(w.message) for w in notices)
    assert rec["optimizer_momentum"] is None  # AdamW has no SGD momentum to hand over
    # The exact-exchange ablation: FrozenAdamW built by the script, v frozen after 2 steps.
    with pytest.warns(UserWarning, match="FrozenAdamW: exact AdamW for warmup_steps=2"):
        frozen = train_inprocess("stdlib-lstm", "none", {}, 0, 2, 3, 3, width=16, seq=8, batch_size=4,
                                 eval_chars=256, optimizer="frozen-adamw", warmup_steps=2, lr=1e-3)
    assert frozen["parameters_identical_on_all_ranks"] and frozen["ratio"] == 1.0
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train_inprocess("stdlib-lstm", "none", {}, 0, 2, 1, 1, width=16, seq=8, batch_size=4,
                        eval_chars=256, optimizer="lamb")


def test_adam_product_names_records_by_their_shape():
    from launch.adam_product import SHAPE, record_prefix, shape_for

    assert shape_for() == SHAPE and record_prefix(SHAPE) == ""
    assert record_prefix(shape_for("transformer", steps=1600)) == "stdlib-transformer_s1600_lr0.02_"
    lstm = shape_for("lstm", lr=3e-3)
    assert lstm["optimizer"] == "adamw" and record_prefix(lstm) == "stdlib-lstm_s300_lr0.003_adamw_"
    with pytest.raises(ValueError, match="steps must be"):
        shape_for(steps=0)


def test_adam_product_reads_compressor_parameters_and_labels_the_ablation():
    from launch.adam_product import method_label, parse_params

    assert parse_params(["bin_size=25", "ratio=0.05"]) == {"bin_size": 25, "ratio": 0.05}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_params(["bin_size"])
    assert method_label("adacomp", {"bin_size": 25}, None) == "adacomp bin_size=25"
    assert "exact exchange" in method_label("none", {}, "frozen-adamw")
