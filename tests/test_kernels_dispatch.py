"""How ``hvdcomp.kernels`` picks a backend: every operation is a function defined in
``kernels/__init__.py`` with both implementations behind it, ``HVDCOMP_KERNELS`` routes each
call (``triton``, ``reference``, ``auto``: CPU tensors to the CPU backend), and
:func:`~hvdcomp.kernels.one_mode` reads the variable once for the calls it holds."""
import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch

import kernel_oracle as oracle
from conftest import KERNEL_DEVICE, kernel_scalar, kernel_vector, requires_triton
from hvdcomp import kernels

INIT = Path(kernels.__file__)


def _args(name: str):
    """Small valid arguments of operation ``name``, fresh at every call (some ops write in place)."""
    x, g = kernel_vector(100, seed=1), kernel_vector(100, torch.bfloat16, seed=2)
    u8 = torch.arange(50, dtype=torch.uint8, device=KERNEL_DEVICE)
    table = {
        "ef_accumulate_": lambda: (x, g),
        "dgc_momentum_": lambda: (x, kernel_vector(100, seed=3), g, 0.9),
        "adacomp_select_stats": lambda: (x, g, 50),
        "adacomp_pack_": lambda: (x, g, 50, *_adacomp_offsets_scale_codes(x, g)),
        "adacomp_decode_sum": lambda: (u8[:6], torch.full((1, 2), 3, dtype=torch.int32, device=KERNEL_DEVICE),
                                       kernel_scalar(0.5), 50, 100),
        "terngrad_ternarize": lambda: (g, kernel_scalar(2.0), kernel_scalar(float("inf")), 3),
        "ternary_quantize": lambda: (g, kernel_scalar(0.5)),
        "sign_pack": lambda: (g,),
        "sign_decode_sum": lambda: (u8.view(2, 25), kernel_scalar(1.0).repeat(2), 200),
        "ternary_decode_sum": lambda: (u8.view(2, 25), kernel_scalar(1.0).repeat(2), 100),
        "topk_indices": lambda: (g, 10),
        "sampled_threshold": lambda: (x, 0.1, torch.arange(0, 100, 3, device=KERNEL_DEVICE)),
        "count_above": lambda: (x, kernel_scalar(1.0)),
        "compact_above": lambda: (x, kernel_scalar(1.0), int((x.abs() >= 1.0).sum())),
        "pack_2bit": lambda: (u8 % 4,),
        "unpack_2bit": lambda: (u8, 200),
        "pack_bits": lambda: (u8 % 2,),
        "unpack_bits": lambda: (u8, 400),
        "scatter_add_": lambda: (x, torch.arange(0, 100, 7, device=KERNEL_DEVICE), g[:15]),
        "cast_bf16": lambda: (x,),
        "cast_fp16": lambda: (x,),
        "cast_fp32": lambda: (g,),
    }
    return table[name]()


def _adacomp_offsets_scale_codes(x, g):
    counts, abs_sum = oracle.adacomp_select_stats(x, g, 50)
    offsets = torch.cumsum(counts.to(torch.int64), 0) - counts
    scale = (abs_sum / int(counts.sum())).to(torch.float32)
    return (offsets.to(x.device), scale.to(x.device),
            torch.empty(int(counts.sum()), dtype=torch.uint8, device=x.device))


def _spy(monkeypatch, module, name, calls, label):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(label)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def _outputs(result):
    return [t.cpu() for t in (result if isinstance(result, tuple) else (result,))]


def test_every_operation_is_a_function_defined_in_the_package():
    tree = ast.parse(INIT.read_text())
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert set(kernels.OPERATIONS) <= defined
    for name in kernels.__all__:
        obj = getattr(kernels, name)
        if callable(obj) and name in defined:
            assert obj.__module__ == "hvdcomp.kernels" and "[" in obj.__doc__, name  # shapes in the docstring


@pytest.mark.parametrize("name", list(kernels.OPERATIONS))
def test_both_backends_implement_the_operation_with_its_signature(name):
    public = list(inspect.signature(getattr(kernels, name)).parameters)
    assert list(inspect.signature(kernels.cpu_impl(name)).parameters) == public
    family = kernels.OPERATIONS[name]
    assert kernels.cpu_impl(name).__module__ == f"hvdcomp.kernels.cpu.{family}"
    try:
        importlib.import_module("triton")
    except ImportError:
        return
    assert list(inspect.signature(kernels.triton_impl(name)).parameters) == public
    assert kernels.triton_impl(name).__module__ == f"hvdcomp.kernels.{family}"


@requires_triton
@pytest.mark.parametrize("name", list(kernels.OPERATIONS))
def test_env_routes_each_call(monkeypatch, name):
    """``triton`` runs the kernel, ``reference`` the CPU backend, ``auto`` the CPU backend for
    a CPU tensor (and the kernel for a CUDA one); both give the same result."""
    calls = []
    _spy(monkeypatch, importlib.import_module(f"hvdcomp.kernels.{kernels.OPERATIONS[name]}"), name, calls, "triton")
    _spy(monkeypatch, importlib.import_module(f"hvdcomp.kernels.cpu.{kernels.OPERATIONS[name]}"), name, calls, "cpu")
    op = getattr(kernels, name)

    monkeypatch.setenv("HVDCOMP_KERNELS", "triton")
    got = op(*_args(name))
    monkeypatch.setenv("HVDCOMP_KERNELS", "reference")
    want = op(*_args(name))
    monkeypatch.setenv("HVDCOMP_KERNELS", "auto")
    op(*_args(name))
    assert calls == ["triton", "cpu", "triton" if KERNEL_DEVICE == "cuda" else "cpu"]
    for a, b in zip(_outputs(got), _outputs(want)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_one_mode_reads_the_variable_once_and_nests(monkeypatch):
    monkeypatch.setenv("HVDCOMP_KERNELS", "reference")
    with kernels.one_mode():
        monkeypatch.setenv("HVDCOMP_KERNELS", "triton")  # changed inside: not seen until the scope ends
        assert kernels.backend_mode() == "reference"
        with kernels.one_mode():
            assert kernels.backend_mode() == "reference"
        assert kernels.backend_mode() == "reference"
    assert kernels.backend_mode() == "triton"
    monkeypatch.setenv("HVDCOMP_KERNELS", "bogus")
    with pytest.raises(ValueError, match="HVDCOMP_KERNELS"):
        with kernels.one_mode():
            pass
    from hvdcomp.kernels import dispatch

    assert dispatch._SCOPE.mode is None


def test_auto_runs_the_cpu_backend_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("HVDCOMP_KERNELS", " Auto ")  # case and blanks do not matter
    assert not kernels.use_triton(torch.zeros(1))
    monkeypatch.setenv("HVDCOMP_KERNELS", "reference")
    assert not kernels.use_triton(torch.zeros(1))
