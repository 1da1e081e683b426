import math

import pytest

from medssl3d.engine.schedules import cosine, linear, linear_warmup, warmup_cosine


def test_cosine_known_values():
    assert cosine(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert cosine(250, 100, 0.04, 0.4) == pytest.approx(0.4)
    # quarter of the way: end + (start - end) * (1 + cos(pi/4)) / 2
    assert cosine(25, 100, 0.996, 1.0) == pytest.approx(1.0 - 0.004 * (1 + math.sqrt(0.5)) / 2)
    assert cosine(0, 0, 1.0, 2.0) == 2.0


def test_linear_and_teacher_temperature_warmup():
    assert linear(0, 10, 0.0, 1.0) == 0.0
    assert linear(3, 10, 0.0, 1.0) == pytest.approx(0.3)
    assert linear(12, 10, 0.0, 1.0) == 1.0
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(31, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup(0, 0, 0.04, 0.07) == pytest.approx(0.07)


def test_warmup_cosine_known_values():
    kw = dict(total=110, warmup=10, base=1e-3, final=1e-5)
    assert warmup_cosine(0, **kw) == 0.0
    assert warmup_cosine(5, **kw) == pytest.approx(5e-4)
    assert warmup_cosine(10, **kw) == pytest.approx(1e-3)
    assert warmup_cosine(60, **kw) == pytest.approx((1e-3 + 1e-5) / 2)
    assert warmup_cosine(110, **kw) == pytest.approx(1e-5)
    assert warmup_cosine(2, total=10, warmup=4, base=1.0, final=0.0, warmup_start=0.5) == pytest.approx(0.75)


def test_warmup_cosine_is_monotone_after_warmup():
    values = [warmup_cosine(s, 50, 5, 1.0, 0.1) for s in range(5, 51)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("call", [lambda: cosine(-1, 10, 0, 1), lambda: warmup_cosine(0, 10, 11, 1, 0)])
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()
