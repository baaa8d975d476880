"""Every Triton kernel through Triton's real GPU compiler for sm_80 and sm_90, without a GPU.

The interpreter (which the other kernel tests use on CPU) forgives what the GPU pipeline
rejects; here ``python -m bench.compile_report`` runs the package's own launch code under a
compile-only CUDA driver (:mod:`bench.compile_only`), in a fresh process without
``TRITON_INTERPRET``, on two Triton versions at once:

* the pinned one (``launch/requirements.txt``), with this interpreter;
* 3.6, the GPU image's, with the venv of ``launch/triton36_env.sh`` (``.venv-triton36`` or
  ``HVDCOMP_TRITON36_PYTHON``); skipped when it is absent unless ``HVDCOMP_REQUIRE_TRITON36=1``
  (``launch/test.sh`` sets it, so CI never skips it).

A cold run compiles about 300 specializations per target (a few minutes on 2 cores per
version; Triton's on-disk cache makes a rerun take seconds).
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_triton

pytestmark = requires_triton
REPO = Path(__file__).resolve().parent.parent


def _pinned_triton() -> str:
    text = (REPO / "launch" / "requirements.txt").read_text()
    return re.search(r"^triton==(\S+)", text, re.M).group(1)


def _triton36_python() -> str | None:
    explicit = os.environ.get("HVDCOMP_TRITON36_PYTHON")
    if explicit:
        return explicit
    default = REPO / ".venv-triton36" / "bin" / "python"
    return str(default) if default.exists() else None


def jit_functions_in_source() -> set[str]:
    """``module.function`` of every ``@triton.jit`` in kernels/*.py, read from the source
    (independently of the report's own listing)."""
    names = set()
    for path in sorted((REPO / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(ast.unparse(d).startswith("triton.jit")
                                                         for d in node.decorator_list):
                names.add(f"{path.stem}.{node.name}")
    return names


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Start both versions' reports at once (two processes for the two cores); their
    (returncode, output, record) by version label."""
    pythons = {"pinned": sys.executable}
    t36 = _triton36_python()
    if t36:
        pythons["3.6"] = t36
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out_dir = tmp_path_factory.mktemp("compile")
    procs = {}
    for label, py in pythons.items():
        out = out_dir / f"{label}.json"
        procs[label] = (subprocess.Popen([py, "-m", "bench.compile_report", "--out", str(out)], cwd=REPO, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out)
    results = {}
    for label, (proc, out) in procs.items():
        output, _ = proc.communicate(timeout=3600)
        record = json.loads(out.read_text()) if out.exists() else None
        results[label] = (proc.returncode, output, record)
    return results


def _report(reports, label):
    if label not in reports:
        if os.environ.get("HVDCOMP_REQUIRE_TRITON36") == "1":
            pytest.fail("HVDCOMP_REQUIRE_TRITON36=1 but no Triton-3.6 venv: run bash launch/triton36_env.sh")
        pytest.skip("no Triton-3.6 venv (bash launch/triton36_env.sh creates it)")
    code, output, record = reports[label]
    assert record is not None, output[-5000:]
    return code, output, record


@pytest.mark.parametrize("label", ["pinned", "3.6"])
def test_every_kernel_compiles_for_sm80_and_sm90(reports, label):
    code, output, record = _report(reports, label)
    want = _pinned_triton() if label == "pinned" else "3.6"
    assert record["versions"]["triton"].startswith(want), record["versions"]
    failed = [c for c in record["cases"] if not c["ok"]]
    assert not failed, failed[:5]
    assert record["targets"] == ["sm_80", "sm_90"]
    assert not any(record["missing"].values()), record["missing"]
    assert code == 0, output[-5000:]
    # The report's listing of JITFunctions is the source's; every one compiled or was inlined.
    assert set(record["kernels"]) == jit_functions_in_source()
    for name, entry in record["kernels"].items():
        for target in record["targets"]:
            t = entry["targets"][target]
            if entry["role"] == "kernel":
                assert t["specializations"] >= 1, (name, target)
            else:
                assert t["reached_from_kernel"], (name, target)
    # Every spilling kernel says why.
    spilling = [n for n, e in record["kernels"].items()
                if e.get("usage_summary") and (e["usage_summary"]["spill_stores"] or e["usage_summary"]["spill_loads"])]
    assert set(spilling) <= set(record["spill_notes"]), spilling
    assert "spills" in record["table"]


def _signatures(record, name, target="sm_90"):
    return [s["signature"] for s in record["kernels"][name]["targets"][target]["compiled"]]


@pytest.mark.parametrize("label", ["pinned", "3.6"])
def test_specializations_cover_what_users_hit(reports, label):
    """The axes the cases walk really reached the compiler: gradient dtypes (bf16 as int16
    bits), 64-bit sizes, both AdaComp code widths, int32/int64 sparse indices."""
    _, _, record = _report(reports, label)
    ef = _signatures(record, "residual._ef_accumulate_kernel")
    assert {s["g_ptr"] for s in ef} == {"*fp32", "*fp16", "*i16"}
    assert {s["n"] for s in ef} >= {"i32", "i64"}
    assert {s["g_stride"] for s in ef} == {"constexpr", "i32"}  # stride 1 is specialised away; [::2] is not
    pack = _signatures(record, "adacomp._pack_kernel")
    assert {s["codes_ptr"] for s in pack} == {"*u8", "*i16"}
    decode = _signatures(record, "adacomp._decode_sum_kernel")
    assert {s["codes_ptr"] for s in decode} == {"*u8", "*i16"}
    tiles = set()
    for spec in record["kernels"]["adacomp._select_stats_kernel"]["targets"]["sm_90"]["compiled"]:
        names = list(spec["signature"])
        tiles.add(tuple(spec["constexprs"][f"({names.index(p)},)"] for p in ("BINS", "CHUNK")))
    # L_T 2; 50 and 64; 65; 500; 4096 and 16384 (walked in chunks of 4096)
    assert tiles == {("2048", "2"), ("64", "64"), ("32", "128"), ("8", "512"), ("1", "4096")}
    scatter = _signatures(record, "decode._scatter_add_kernel")
    assert {s["idx_ptr"] for s in scatter} == {"*i32", "*i64"}
    assert {s["val_ptr"] for s in scatter} == {"*fp32", "*fp16", "*i16"}
