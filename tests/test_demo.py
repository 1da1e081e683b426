"""The demo's verdict: per-seed paired differences, their mean, and a sentence that says which way it went."""

import pytest

from medssl3d.demo import dice_table


def _dice(pairs):
    out = {}
    for seed, (scratch, pretrained) in enumerate(pairs):
        out[("scratch", seed)] = {"per_class": {"brain": scratch}, "mean": scratch}
        out[("pretrained", seed)] = {"per_class": {"brain": pretrained}, "mean": pretrained}
    return out


@pytest.mark.parametrize(("pairs", "verdict", "mean"), [
    ([(0.80, 0.85), (0.82, 0.83)], "Pretraining was at least as good as scratch in every seed (+0.030 Dice on "
     "average), but the interval includes 0", "+0.030"),
    ([(0.80, 0.85), (0.82, 0.87)], "Pretraining helped: +0.050 Dice on the held-out head, in every seed.", "+0.050"),
    ([(0.80, 0.90), (0.82, 0.81)], "Pretraining helped on average (+0.045 Dice) but not in every seed", "+0.045"),
    ([(0.90, 0.85), (0.92, 0.91)], "Pretraining did not help at this size: -0.030 Dice", "-0.030"),
])
def test_table_pairs_each_seed_and_states_the_verdict(pairs, verdict, mean):
    table = dice_table(_dice(pairs), (0, 1))
    assert verdict in table
    first = pairs[0]
    assert f"| 0 | brain | {first[0]:.3f} | {first[1]:.3f} | {first[1] - first[0]:+.3f} |" in table
    assert f"| mean | all | {sum(p[0] for p in pairs) / 2:.3f} | {sum(p[1] for p in pairs) / 2:.3f} | {mean} |" in table
    assert "seeds [0, 1]" in table


def test_the_verdict_gives_the_95_interval_of_the_paired_mean():
    # per-seed differences +0.05 and +0.01: mean +0.03, sd 0.02828, t(1 dof) 12.706 -> half-width 0.254
    table = dice_table(_dice([(0.80, 0.85), (0.82, 0.83)]), (0, 1))
    assert "95 % interval of the paired mean: -0.224 … +0.284 (includes 0)." in table
    # three seeds all well above: the interval excludes 0
    table = dice_table(_dice([(0.80, 0.85), (0.80, 0.86), (0.80, 0.855)]), (0, 1, 2))
    assert "(excludes 0)" in table
    assert "interval" not in dice_table(_dice([(0.80, 0.85)]), (0,))
