"""The kernel timeline's accounting: increments sum to the span, overlap costs nothing."""
from hypothesis import given, strategies as st

from pagedllm.bench.kernel_timeline import increments, summarize


def test_overlapped_kernel_costs_only_what_sticks_out():
    rows = increments([("b", 8.0, 15.0), ("a", 0.0, 10.0), ("c", 9.0, 12.0), ("d", 20.0, 21.0)])
    assert [r[0] for r in rows] == ["a", "b", "c", "d"]  # start order
    assert [r[2] for r in rows] == [10.0, 5.0, 0.0, 6.0]  # d pays for the idle gap
    assert [r[3] for r in rows] == [0.0, -2.0, -6.0, 5.0]


@given(st.lists(st.tuples(st.sampled_from("xyz"), st.floats(0, 100), st.floats(0, 50)),
                min_size=1, max_size=30))
def test_increments_sum_to_the_span(spec):
    kernels = [(n, s, s + d) for n, s, d in spec]
    span = max(e for _, _, e in kernels) - min(s for _, s, _ in kernels)
    assert abs(sum(r[2] for r in increments(kernels)) - span) < 1e-6
    rows = summarize(kernels, steps=1)
    assert abs(sum(r.launches * r.increment_us for r in rows) - span) < 1e-6
