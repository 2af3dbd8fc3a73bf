"""The MLX loop's steady tokens/s: steps that compiled (a batch shape not seen before) are left
out, so the figure is what the loop does once every shape has been traced."""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core")

from tunebus.services.trainer.backends.mlx.loop import _Steady  # noqa: E402


def test_steps_with_a_new_batch_shape_are_left_out_of_the_steady_rate():
    steady = _Steady()
    assert steady.rate() is None
    steady.add((mx.zeros((4, 32)), mx.zeros((4, 2))), 100, 5.0)  # traces the step
    steady.add((mx.zeros((4, 32)), mx.zeros((4, 2))), 100, 1.0)
    steady.add((mx.zeros((4, 64)), mx.zeros((4, 2))), 200, 6.0)  # a new shape: traces again
    steady.add((mx.zeros((4, 64)), mx.zeros((4, 2))), 200, 2.0)
    assert steady.rate() == pytest.approx(300 / 3.0)
