"""hvdcomp.core.groups against Horovod 0.28.1's own grouping rules."""
from __future__ import annotations

import warnings

import pytest
import torch

from distributed import requires_horovod
from hvdcomp.core.groups import form_groups, resolve_groups, split_evenly, validate_groups


@requires_horovod
def test_split_evenly_is_horovods_split_list():
    from horovod.common.util import split_list

    for length in range(0, 13):
        items = list(range(length))
        for n in range(1, 16):
            assert split_evenly(items, n) == split_list(items, n), (length, n)


def _params(n):
    return [torch.zeros(i + 1, requires_grad=True) for i in range(n)]


def _ids(groups):
    return [tuple(id(p) for p in g) for g in groups]


def test_integer_groups():
    ps = _params(5)
    assert _ids(form_groups(ps, 2)) == _ids([(ps[0], ps[1], ps[2]), (ps[3], ps[4])])
    assert _ids(form_groups(ps, 7))[5:] == [(), ()]
    assert _ids(form_groups(ps, None)) == _ids([(p,) for p in ps])


def test_list_groups_keep_inner_order_and_add_singletons():
    ps = _params(5)
    frozen = torch.zeros(3)  # not in p_list (no requires_grad): dropped from its group
    groups = [[ps[3], ps[0]], [frozen]]
    assert _ids(form_groups(ps, groups)) == _ids([(ps[3], ps[0]), (), (ps[1],), (ps[2],), (ps[4],)])


def test_validation_as_horovod():
    ps = _params(2)
    validate_groups(None)
    validate_groups(3)
    validate_groups([[ps[0]], [ps[1]]])
    for bad, match in ((0, "positive integer"), (-2, "positive integer"), (1.5, "positive integer"),
                       ([[ps[0], ps[0]]], "only appear once"), ([[ps[0]], [ps[0]]], "only appear once"),
                       ([["w"]], "torch.Tensor")):
        with pytest.raises(ValueError, match=match):
            validate_groups(bad)
    with pytest.raises(ValueError, match="integer >= 1"):
        split_evenly([1, 2], 0)


def test_num_groups_is_a_deprecated_alias():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_groups(None, 3) == 3
        assert resolve_groups(2, 3) == 2  # groups wins, as in Horovod
    assert [w.category for w in caught] == [DeprecationWarning, DeprecationWarning]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_groups(None, 0) is None
