"""Properties every method compressor must have (single process, reference kernels):
error feedback keeps everything, payloads are exactly their announced size and decode to
what the sender assumed it sent, N payloads sum linearly, any dtype and shape works,
constructor errors, Horovod-contract errors, configs."""
from __future__ import annotations

import math

import pytest
import torch

import hvdcomp
from hvdcomp.compressor import Compressor
from hvdcomp.registry import compression_from_name

from tensor_ranks import Ranks, decode_one

#: name -> constructor params used in the generic tests
METHODS = {
    "adacomp": {"bin_size": 8},
    "terngrad": {},
    "dgc": {"ratio": 0.05, "momentum": 0.9},
    "topk": {"ratio": 0.05},
    "randomk": {"ratio": 0.05},
    "onebit": {},
}
#: compressors whose state is an error-feedback residual: x = r + g is split into sent + r
EF_METHODS = ["adacomp", "topk", "randomk", "onebit"]
PACKED = ["adacomp", "terngrad", "dgc", "topk", "onebit"]
SHAPES = [(1,), (7,), (33, 17), (4, 3, 5, 5), (2, 3, 1, 5, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(name: str, **override) -> Compressor:
    return compression_from_name(name, **{**METHODS[name], **override})


def grad(shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def warm(ranks: Ranks, steps: int, dtype, seed: int = 100):
    """A few steps so that residuals / momenta are non-zero."""
    for t in range(steps):
        ranks.step([grad(ranks.shape, seed + 7 * t + r, dtype) for r in range(ranks.nranks)])


def test_registry_finds_every_method_class():
    from hvdcomp.compressors.adacomp import AdaCompCompressor
    from hvdcomp.compressors.dgc import DGCCompressor
    from hvdcomp.compressors.onebit import OneBitCompressor
    from hvdcomp.compressors.randomk import RandomKCompressor
    from hvdcomp.compressors.topk import TopKCompressor
    from hvdcomp.compressors.terngrad import TernGradCompressor

    expected = {"adacomp": AdaCompCompressor, "terngrad": TernGradCompressor, "dgc": DGCCompressor,
                "topk": TopKCompressor, "randomk": RandomKCompressor, "onebit": OneBitCompressor}
    for name, cls in expected.items():
        comp = make(name)
        assert type(comp) is cls and comp.name == name and comp.linear
    assert {n: make(n).transport for n in METHODS} == {
        "adacomp": "allgather", "terngrad": "allgather", "dgc": "allgather", "topk": "allgather",
        "randomk": "allreduce", "onebit": "allgather"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", EF_METHODS)
def test_error_feedback_keeps_everything(name, shape, dtype):
    """decode(own payload) + new residual == old residual + g (to fp32 rounding)."""
    ranks = Ranks(make(name), shape, dtype=dtype)
    warm(ranks, 2, dtype)
    r_old = ranks.states[0]["residual"].clone()
    g = grad(shape, 5, dtype)
    ex = ranks.step([g])
    sent = ex.total.reshape(-1)
    assert ex.total.dtype == torch.float32 and ex.total.shape == torch.Size(shape)
    x = r_old + g.reshape(-1).float()
    torch.testing.assert_close(sent + ranks.states[0]["residual"], x, rtol=0, atol=1e-6 * (1 + x.abs().max().item()))
    if math.prod(shape) > 1:
        assert not torch.equal(ranks.states[0]["residual"], r_old)  # the state really moved


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dgc_velocity_is_split_into_sent_and_kept(shape, dtype):
    """DGC's error feedback is on v: decode(own payload) + new v == v after momentum."""
    comp = make("dgc")
    ranks = Ranks(comp, shape, dtype=dtype)
    warm(ranks, 2, dtype)
    u, v = (ranks.states[0][k].clone() for k in ("u", "v"))
    g = grad(shape, 5, dtype).reshape(-1).float()
    v_full = v + (comp.momentum * u + g)
    ex = ranks.step([grad(shape, 5, dtype)])
    torch.testing.assert_close(ex.total.reshape(-1) + ranks.states[0]["v"], v_full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", PACKED)
def test_payload_is_exactly_the_announced_size_and_decodes_what_was_sent(name):
    """Each rank's payload decodes alone to exactly x - new residual (what it assumed it
    sent); every rank decodes the same sum; the sum is the sum of the single decodes."""
    comp = make(name)
    nranks, shape = 3, (40, 13)
    ranks = Ranks(comp, shape, nranks)
    warm(ranks, 2, torch.float32)
    before = [dict((k, v.clone()) for k, v in s.items()) for s in ranks.states]
    grads = [grad(shape, 50 + r) for r in range(nranks)]
    ex = ranks.step(grads)
    singles = []
    for r in range(nranks):
        assert ex.payloads[r].numel() == ex.sizes[r]
        single = decode_one(comp, ex.payloads[r], ranks.infos[r])
        singles.append(single.reshape(-1))
        if name in EF_METHODS:
            assumed = before[r]["residual"] + grads[r].reshape(-1) - ranks.states[r]["residual"]
        elif name == "dgc":
            u = comp.momentum * before[r]["u"] + grads[r].reshape(-1)
            assumed = before[r]["v"] + u - ranks.states[r]["v"]
        else:
            continue  # terngrad: checked against an independent ternarization in its own tests
        torch.testing.assert_close(single.reshape(-1), assumed, rtol=0, atol=1e-6)
    for r in range(1, nranks):
        assert torch.equal(ex.totals[r], ex.totals[0])
    torch.testing.assert_close(ex.total.reshape(-1), sum(singles), rtol=1e-6, atol=1e-6)
    sel = comp.selected_count(ex.sizes[0], ranks.infos[0])
    if name in ("adacomp", "dgc", "topk"):
        assert sel == int((singles[0] != 0).sum())


@pytest.mark.parametrize("name", list(METHODS))
def test_all_zero_gradients(name):
    shape = (6, 50)
    ranks = Ranks(make(name), shape, nranks=2)
    for _ in range(2):
        ex = ranks.step([torch.zeros(shape), torch.zeros(shape)])
        assert torch.equal(ex.total, torch.zeros(shape))
        for s in ranks.states:
            for key, value in s.items():
                assert torch.equal(value, torch.zeros_like(value)), key
    if name in ("adacomp", "dgc"):  # data-dependent selection: nothing is worth sending
        assert ranks.comp.selected_count(ex.sizes[0], ranks.infos[0]) == 0


@pytest.mark.parametrize("name", list(METHODS))
def test_empty_tensor(name):
    ranks = Ranks(make(name), (0, 5), nranks=2)
    ex = ranks.step([torch.zeros(0, 5), torch.zeros(0, 5)])
    assert ex.total.shape == (0, 5) and ex.total.dtype == torch.float32


@pytest.mark.parametrize("name", list(METHODS))
def test_wrong_gradient_size_is_an_error(name):
    ranks = Ranks(make(name), (10,))
    with pytest.raises(ValueError, match="elements"):
        ranks.step([torch.ones(11)])


@pytest.mark.parametrize("name", ["adacomp", "dgc", "topk", "onebit"])
def test_horovod_compress_of_packed_compressor_points_to_our_optimizer(name):
    with pytest.raises(TypeError, match=r"hvdcomp\.DistributedOptimizer"):
        make(name).compress(torch.ones(10))


BAD_PARAMS = [
    ("adacomp", {"bin_size": 1}, "bin_size"),
    ("adacomp", {"bin_size": 16385}, "bin_size"),
    ("adacomp", {"conv_bin_size": 0}, "conv_bin_size"),
    ("adacomp", {"fc_bin_size": 100000}, "fc_bin_size"),
    ("adacomp", {"fc_bin_size": 50.5}, "fc_bin_size"),
    ("adacomp", {"bin_sizes": {"fc.weight": 1}}, "bin_sizes"),
    ("adacomp", {"bin_sizes": [("a", 5)]}, "bin_sizes"),
    ("terngrad", {"clip": 0.0}, "clip"),
    ("terngrad", {"clip": -1.0}, "clip"),
    ("terngrad", {"clip": float("inf")}, "clip"),
    ("terngrad", {"seed": -1}, "seed"),
    ("dgc", {"ratio": 0.0}, "ratio"),
    ("dgc", {"ratio": 1.5}, "ratio"),
    ("dgc", {"momentum": 1.0}, "momentum"),
    ("dgc", {"momentum": -0.1}, "momentum"),
    ("dgc", {"sample_ratio": 0.0}, "sample_ratio"),
    ("dgc", {"sample_ratio": 2.0}, "sample_ratio"),
    ("dgc", {"clip_norm": 0.0}, "clip_norm"),
    ("dgc", {"clip_norm": -2.0}, "clip_norm"),
    ("dgc", {"warmup_steps": -1}, "warmup_steps"),
    ("dgc", {"warmup_ratios": ()}, "warmup_ratios"),
    ("dgc", {"warmup_ratios": (0.5, 0.0)}, "warmup_ratios"),
    ("dgc", {"value_dtype": torch.int8}, "value_dtype"),
    ("dgc", {"value_dtype": "fp16"}, "value_dtype"),
    ("topk", {"ratio": 0.0}, "ratio"),
    ("topk", {"ratio": -0.5}, "ratio"),
    ("topk", {"ratio": 1.01}, "ratio"),
    ("topk", {"ratio": "x"}, "ratio"),
    ("randomk", {"ratio": 0.0}, "ratio"),
    ("randomk", {"ratio": 2}, "ratio"),
    ("randomk", {"seed": 1.5}, "seed"),
]


@pytest.mark.parametrize("name,params,word", BAD_PARAMS, ids=[f"{n}-{w}-{i}" for i, (n, _, w) in enumerate(BAD_PARAMS)])
def test_bad_parameters_raise_value_error_at_construction(name, params, word):
    base = {"topk": {"ratio": 0.1}, "randomk": {"ratio": 0.1}}.get(name, {})
    with pytest.raises(ValueError, match=word) as err:
        compression_from_name(name, **{**base, **params})
    # the message states the valid range / values
    assert any(s in str(err.value) for s in ("[", "(", "one of", "integer")), str(err.value)


@pytest.mark.parametrize("name", list(METHODS))
def test_config_names_every_setting_and_tells_settings_apart(name):
    comp = make(name)
    cfg = comp.config()
    assert cfg["name"] == name
    assert make(name).config() == cfg
    for key, value in METHODS[name].items():
        assert cfg[key] == value
    other = {"adacomp": {"bin_size": 9}, "terngrad": {"clip": None}, "dgc": {"warmup_steps": 3},
             "topk": {"ratio": 0.06}, "randomk": {"seed": 1}, "onebit": None}[name]
    if other is not None:
        assert make(name, **other).config() != cfg
    assert repr(comp).startswith(type(comp).__name__ + "(")
    torch.save(cfg, __import__("io").BytesIO())  # picklable: the transport gathers it


@pytest.mark.parametrize("name", list(METHODS))
def test_public_api_is_documented(name):
    comp = make(name)
    cls = type(comp)
    assert cls.__doc__ and "Wire" in cls.__doc__
    for attr in ("encode", "decode_sum", "encode_dense", "decode_dense", "init_state", "config", "selected_count",
                 "compress", "decompress", "local_scale", "ratio_at", "bin_size_for", "k"):
        if not hasattr(cls, attr):
            continue
        method = getattr(cls, attr)
        if method.__qualname__.startswith(cls.__name__ + "."):
            assert method.__doc__, f"{cls.__name__}.{attr}"
    assert __import__(cls.__module__, fromlist=["x"]).__doc__


def test_compression_namespace_builds_them():
    assert isinstance(hvdcomp.Compression.topk(ratio=0.5), Compressor)
    assert hvdcomp.Compression.dgc().ratio == 0.001
    assert math.isclose(hvdcomp.Compression.terngrad().clip, 2.5)
