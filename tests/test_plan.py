"""Plans are pure values: checked here without any tensor."""

from __future__ import annotations

import pytest

from tli.config import InjectConfig
from tli.errors import TliError
from tli.inject.plan import Plan, make_plan, plan_dus, plan_stack, plan_tli


def layout(plan: Plan) -> list[tuple[tuple[int, ...], str]]:
    return [(s.sources, s.init) for s in plan.layers]


def test_tli_interval_5_on_30_layers_gives_36():
    p = plan_tli(30, interval=5)
    assert p.num_layers_out == 36
    assert p.new_layers == (5, 11, 17, 23, 29, 35)
    # each new layer copies the original layer just before it, with zeroed output projections
    assert [p.layers[i].source for i in p.new_layers] == [4, 9, 14, 19, 24, 29]
    assert all(p.layers[i].out_scale == 0.0 for i in p.new_layers)
    assert p.function_preserving


@pytest.mark.parametrize(("n", "k", "out"), [(32, 4, 40), (32, 2, 48), (30, 7, 34), (5, 5, 6)])
def test_tli_layer_counts(n, k, out):
    assert plan_tli(n, interval=k).num_layers_out == out == n + n // k


def test_interval_1_doubles_and_interleaves():
    p = plan_tli(3, interval=1)
    assert layout(p) == [
        ((0,), "original"), ((0,), "identity"),
        ((1,), "original"), ((1,), "identity"),
        ((2,), "original"), ((2,), "identity"),
    ]  # fmt: skip


def test_interval_n_adds_one_layer_at_the_end():
    p = plan_tli(4, interval=4)
    assert p.new_layers == (4,)
    assert p.layers[4].sources == (3,)


def test_positions_at_the_end_and_source_next_falls_back():
    p = plan_tli(4, positions=[3, 0], source="next", init="copy")
    assert layout(p) == [
        ((0,), "original"), ((1,), "copy"), ((1,), "original"),
        ((2,), "original"), ((3,), "original"), ((3,), "copy"),
    ]  # fmt: skip
    assert p.params["positions"] == [0, 3]
    assert not p.function_preserving


def test_interpolate_takes_both_neighbours():
    p = plan_tli(4, interval=2, init="interpolate")
    assert [p.layers[i].sources for i in p.new_layers] == [(1, 2), (3,)]
    assert all(p.layers[i].out_scale == 1.0 for i in p.new_layers)


def test_alpha_scales_output_projections():
    p = plan_tli(4, interval=2, init="copy", alpha=0.5)
    assert {p.layers[i].out_scale for i in p.new_layers} == {0.5}
    assert plan_tli(4, interval=2, init="copy", alpha=0.0).function_preserving


def test_dus_solar_map():
    p = plan_dus(32, overlap=8)
    assert p.num_layers_out == 48
    assert [s.source for s in p.layers] == list(range(24)) + list(range(8, 32))
    # layers 8..23 appear twice: their second use is a new copy; 24..31 are first uses
    assert p.new_layers == tuple(range(24, 40))
    assert plan_dus(8).params["overlap"] == 2  # default N // 4


def test_stack_map():
    p = plan_stack(3, repeat=3)
    assert [s.source for s in p.layers] == [0, 1, 2] * 3
    assert p.new_layers == (3, 4, 5, 6, 7, 8)


def test_plan_json_round_trip_and_equality():
    p = make_plan(12, InjectConfig(interval=3, init="interpolate"))
    assert Plan.from_dict(p.to_dict()) == p
    assert make_plan(12, InjectConfig(interval=3, init="interpolate")) == p
    assert make_plan(12, InjectConfig(interval=4)) != p


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"interval": 0}, "interval 0 out of range"),
        ({"interval": 7}, "interval 7 out of range"),
        ({"positions": [6]}, "positions [6] out of range"),
        ({"positions": [1, 1]}, "repeat"),
        ({"interval": 2, "alpha": 0.5}, "contradicts init identity"),
    ],
)
def test_bad_tli_plans(kw, msg):
    with pytest.raises(TliError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        plan_tli(6, **kw)


def test_bad_overlap():
    with pytest.raises(TliError, match="overlap 6 out of range"):
        plan_dus(6, overlap=6)
