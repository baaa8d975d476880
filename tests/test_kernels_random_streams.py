"""The Philox-4x32-10 stream: the oracle against the published known-answer vectors, and the
CPU backend's emulation of Triton's ``tl.rand`` / ``tl.rand4x`` (``kernels.philox_uniform``,
``kernels.philox_uniform4``, TernGrad's per-element draw) against the oracle. The Triton
kernel's own draw is checked through TernGrad's codes (tests/test_kernels_ternary.py)."""

import pytest
import torch

import kernel_oracle as oracle
from hvdcomp import kernels
from hvdcomp.kernels.cpu import random_streams

#: Philox4x32-10 known answers of Random123 (Salmon et al., SC 2011; its ``kat_vectors``):
#: counter (4 words), key (2 words) -> output (4 words).
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

SEEDS = [0, 1, 2**31 - 1, 2**31 + 5, 2**32 - 1, 2**32, 2**40 + 12345, 2**63 - 1]


@pytest.mark.parametrize("counter, key, want", KNOWN_ANSWERS)
def test_oracle_philox_gives_the_known_answers(counter, key, want):
    assert tuple(oracle.philox4x32_10(counter, key)) == want


def test_oracle_uniforms_follow_tl_rand_mapping():
    """A word w maps to ``fold(int32(w)) * 4.6566127342e-10`` in fp32, ``fold(i) = i`` for
    ``i >= 0`` and ``-i - 1`` below: 0 and 2**32 - 1 (int32 -1) to 0, 2**31 - 1 and 2**31
    (int32 -2**31) to the largest value."""
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 - 2])
    u = oracle._uniform_of_word(words.numpy().astype("uint64"))
    assert u[0] == 0 and u[4] == 0 and u[2] == u[3] and u[1] == u[5] > 0
    assert (u <= u[2]).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_uniforms_match_oracle(seed):
    counters = torch.cat([torch.arange(1000), torch.tensor([2**31 - 1, 2**31, 2**32 - 1])])
    assert torch.equal(kernels.philox_uniform4(seed, counters), oracle.philox_uniform4(seed, counters))
    assert torch.equal(kernels.philox_uniform(seed, counters), oracle.philox_uniform(seed, counters))


@pytest.mark.parametrize("numel", [0, 1, 5, 4099, 70001])
def test_element_uniforms_take_word_i_mod_4_of_counter_i_div_4(numel):
    got = random_streams.element_uniforms(2**40 + 7, numel)
    assert torch.equal(got, oracle.element_uniforms(2**40 + 7, numel))


def test_fast_uniforms_are_torchs_generator():
    want = torch.rand(1001, generator=torch.Generator().manual_seed(12345))
    assert torch.equal(random_streams.fast_uniforms(12345, 1001), want)
