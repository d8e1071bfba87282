"""Specification of the learning-rate schedules and the per-epoch weight decay, against the references'
own schedules written out by hand (HaS train.lua) or re-run as their loop does (wsolevaluation main.py)."""
import pytest
import torch

from trainers.config import OptimConfig
from trainers.optim import build_optimizer, build_scheduler, lr_factor, set_weight_decay, weight_decay_factor

# kkanshul/Hide-and-Seek train.lua, paramsForEpoch: (first epoch, last epoch, LR, WD), epochs counted from 1.
TRAIN_LUA_REGIMES = [(1, 18, 1e-2, 5e-4), (19, 29, 5e-3, 5e-4), (30, 43, 1e-3, 0.0), (44, 52, 5e-4, 0.0),
                     (53, 55, 1e-4, 0.0)]
HAS_AUTHORS = OptimConfig(lr=0.01, weight_decay=5e-4, epochs=55, schedule="multistep", warmup_fraction=0,
                          milestones=(18, 29, 43, 52), lr_factors=(1, 0.5, 0.1, 0.05, 0.01),
                          weight_decay_factors=(1, 1, 0, 0, 0))


def train_lua(epoch: int) -> tuple[float, float]:
    """(lr, weight decay) of the 0-based `epoch` read off the regime table."""
    for first, last, lr, wd in TRAIN_LUA_REGIMES:
        if first <= epoch + 1 <= last:
            return lr, wd
    raise AssertionError(epoch)


def wsolevaluation_lrs(lr: float, epochs: int, decay_frequency: int) -> list[float]:
    """The rate of each 0-based epoch, as wsolevaluation's main loop sets it: adjust_learning_rate(epoch + 1)
    multiplies by 0.1 before training every 1-based epoch divisible by lr_decay_frequency."""
    rates = []
    for epoch in range(epochs):
        if (epoch + 1) % decay_frequency == 0:
            lr *= 0.1
        rates.append(lr)
    return rates


def test_multistep_gives_the_has_authors_rate_and_weight_decay_in_every_epoch():
    for epoch in range(55):
        lr, wd = train_lua(epoch)
        assert HAS_AUTHORS.lr * lr_factor(HAS_AUTHORS, epoch) == pytest.approx(lr, rel=1e-12), epoch
        assert HAS_AUTHORS.weight_decay * weight_decay_factor(HAS_AUTHORS, epoch) == wd, epoch


@pytest.mark.parametrize("epochs, frequency, milestones", [(50, 15, (14, 29, 44)), (10, 3, (2, 5, 8))])
def test_multistep_milestones_reproduce_wsolevaluation_decay_frequency(epochs, frequency, milestones):
    config = OptimConfig(lr=1e-3, epochs=epochs, schedule="multistep", warmup_fraction=0, milestones=milestones)
    expected = wsolevaluation_lrs(1e-3, epochs, frequency)
    assert [config.lr * lr_factor(config, e) for e in range(epochs)] == pytest.approx(expected, rel=1e-12)
    # The plain 'step' schedule decays one epoch later (at 15, 30, 45): not wsolevaluation's.
    step = OptimConfig(lr=1e-3, epochs=epochs, schedule="step", step_epochs=frequency, warmup_fraction=0)
    assert [step.lr * lr_factor(step, e) for e in range(epochs)] != pytest.approx(expected, rel=1e-12)


def test_a_stage_starts_at_its_milestone_and_not_a_step_earlier():
    assert lr_factor(HAS_AUTHORS, 17.999) == 1.0 and lr_factor(HAS_AUTHORS, 18.0) == 0.5
    assert weight_decay_factor(HAS_AUTHORS, 28) == 1.0 and weight_decay_factor(HAS_AUTHORS, 29) == 0.0


def test_multistep_without_factors_multiplies_by_gamma_at_each_milestone_and_keeps_weight_decay():
    config = OptimConfig(epochs=10, schedule="multistep", warmup_fraction=0, milestones=(3, 7), gamma=0.5)
    assert [lr_factor(config, e) for e in range(10)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert {weight_decay_factor(config, e) for e in range(10)} == {1.0}


def test_other_schedules_keep_weight_decay_constant():
    for schedule in ("cosine", "step", "constant"):
        assert weight_decay_factor(OptimConfig(schedule=schedule), 11) == 1.0


def test_the_scheduler_sets_each_steps_rate_and_set_weight_decay_each_groups_decay():
    config = OptimConfig(lr=0.1, weight_decay=1e-4, epochs=4, schedule="multistep", warmup_fraction=0,
                         milestones=(1, 3), lr_factors=(1, 0.2, 0.04), weight_decay_factors=(1, 0, 2))
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=3)
    rates, decays = [], []
    for epoch in range(4):
        set_weight_decay(optimizer, config, epoch)
        for _ in range(3):
            rates.append(optimizer.param_groups[0]["lr"])
            decays.append(optimizer.param_groups[0]["weight_decay"])
            optimizer.step()
            scheduler.step()
    assert rates == pytest.approx([0.1] * 3 + [0.02] * 6 + [0.004] * 3, rel=1e-12)
    assert decays == [1e-4] * 3 + [0.0] * 6 + [2e-4] * 3
