"""An elastic run that resumes on another number of workers continues the learning-rate schedule at the same point
of the run (epochs), not at the same count of optimizer steps, which mean other rows per step."""

from __future__ import annotations

import pytest
import torch

from ray_app.lr_schedule import continue_schedule, linear_schedule

EPOCHS, ROWS, BATCH = 6, 96, 8


def _run(world: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, int]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    steps_per_epoch = ROWS // world // BATCH
    return optimizer, linear_schedule(optimizer, 0.1, steps_per_epoch * EPOCHS), steps_per_epoch


def _steps(optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_resumed_run_on_another_world_size_keeps_the_rate_of_its_epoch(before: int, after: int) -> None:
    done = 2  # epochs finished before the node was lost
    optimizer, scheduler, per_epoch = _run(before)
    _steps(optimizer, scheduler, done * per_epoch)
    saved = (optimizer.state_dict(), scheduler.state_dict())

    optimizer, scheduler, per_epoch = _run(after)  # the resumed worker group builds its own, then loads the state
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    continue_schedule(scheduler, done * per_epoch)

    reference_opt, reference, ref_per_epoch = _run(after)  # never interrupted, `after` workers throughout
    _steps(reference_opt, reference, done * ref_per_epoch)
    assert scheduler.get_last_lr() == pytest.approx(reference.get_last_lr())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(reference_opt.param_groups[0]["lr"])
    _steps(optimizer, scheduler, (EPOCHS - done) * per_epoch)  # and it ends where a run ends: at zero
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0)
