"""StepTimer: a step counts only when the timer saw it from its start."""

from __future__ import annotations

import torch

from pagedserve.worker.step_timer import StepTimer


def test_a_step_already_in_flight_when_the_timer_is_attached_is_left_out():
    timer = StepTimer(torch.device("cpu"))
    timer.stop()  # under async scheduling, the step in flight finishes first
    assert timer.summary() == {"prepare": [], "runner": [], "device": []}
    for _ in range(2):
        timer.start()
        timer.launch()
        timer.stop()
    summary = timer.summary()
    assert [len(v) for v in summary.values()] == [2, 2, 2]
    assert all(0 <= p <= r for p, r in zip(summary["prepare"], summary["runner"], strict=True))
    timer.stop()  # a second stop closes nothing
    assert len(timer.summary()["runner"]) == 2
