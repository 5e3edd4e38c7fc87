"""The one set of number checks: its messages and what each rejects."""

from __future__ import annotations

import math

import attrs
import pytest

import kill_switch as ks
from kill_switch._vocabulary import _validate as v

NOT_NUMBERS = [True, False, "1", None, [1], 1j]
NOT_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", NOT_NUMBERS)
def test_seconds_rejects_non_numbers_by_type(bad: object) -> None:
    """A bool, str, None or complex is a TypeError naming the parameter and the type."""
    with pytest.raises(TypeError) as caught:
        v.seconds("stop_timeout", bad)
    assert str(caught.value) == (
        f"stop_timeout must be a number of seconds, not {type(bad).__name__}"
    )


@pytest.mark.parametrize("bad", [*NOT_FINITE, -1, -0.5, 0, 0.0])
def test_seconds_rejects_non_finite_and_non_positive(bad: float) -> None:
    """NaN, ±inf, negatives and zero are one ValueError sentence."""
    with pytest.raises(ValueError, match="stop_timeout") as caught:
        v.seconds("stop_timeout", bad)
    assert str(caught.value) == (
        f"stop_timeout must be a finite number of seconds > 0, got {bad!r}"
    )


def test_seconds_zero_ok_says_so() -> None:
    """With zero allowed, 0 passes and the message states ">= 0"."""
    assert v.seconds("grace", 0, zero_ok=True) == 0.0
    with pytest.raises(
        ValueError, match=r"^grace must be a finite number of seconds >= 0, got -1$"
    ):
        v.seconds("grace", -1, zero_ok=True)


def test_values_come_back_as_float() -> None:
    """An int of seconds is returned as a float; a good value passes unchanged."""
    assert v.seconds("t", 2) == 2.0
    assert isinstance(v.seconds("t", 2), float)
    assert v.optional_seconds("t", None) is None
    assert v.optional_seconds("t", 0.5) == 0.5
    assert v.positive("rate", 3) == 3.0


def test_non_negative_and_inf_ok() -> None:
    """A cost may be 0; inf only where the caller gives it a meaning."""
    assert v.non_negative("cost", 0) == 0.0
    with pytest.raises(ValueError, match=r"^cost must be a finite number >= 0, got inf$"):
        v.non_negative("cost", math.inf)
    assert v.non_negative("max_cost", math.inf, inf_ok=True) == math.inf
    with pytest.raises(ValueError, match=r"^max_cost must be a number >= 0, got nan$"):
        v.non_negative("max_cost", math.nan, inf_ok=True)
    with pytest.raises(TypeError, match=r"^cost must be a number, not bool$"):
        v.non_negative("cost", True)


@pytest.mark.parametrize("bad", [True, 1.0, "2", None])
def test_ints_reject_bool_and_float(bad: object) -> None:
    """An int parameter takes neither a bool nor an integral float."""
    with pytest.raises(TypeError, match=rf"^runs must be an int, not {type(bad).__name__}$"):
        v.positive_int("runs", bad)
    with pytest.raises(TypeError, match=rf"^calls must be an int, not {type(bad).__name__}$"):
        v.count("calls", bad)


def test_int_bounds() -> None:
    """positive_int starts at 1, count at 0, each saying its bound."""
    assert v.positive_int("runs", 1) == 1
    assert v.count("calls", 0) == 0
    with pytest.raises(ValueError, match=r"^runs must be an int >= 1, got 0$"):
        v.positive_int("runs", 0)
    with pytest.raises(ValueError, match=r"^calls must be an int >= 0, got -1$"):
        v.count("calls", -1)


def test_attrs_adapter_names_the_field() -> None:
    """attrs_check validates a field under the field's own name, and composes with optional."""

    @attrs.frozen
    class Example:
        wait: float = attrs.field(validator=v.attrs_check(v.seconds))
        grace: float | None = attrs.field(
            default=None,
            validator=attrs.validators.optional(v.attrs_check(v.seconds, zero_ok=True)),
        )

    assert Example(1).wait == 1
    assert Example(1, None).grace is None
    with pytest.raises(ValueError, match=r"^wait must be a finite number of seconds > 0"):
        Example(0)
    with pytest.raises(TypeError, match=r"^grace must be a number of seconds, not str$"):
        Example(1, "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (
            lambda: ks.StopPolicy(stop_timeout=math.nan),
            ValueError,
            "stop_timeout must be a finite number of seconds > 0, got nan",
        ),
        (
            lambda: ks.StopPolicy(max_abandoned_threads=True),
            TypeError,
            "max_abandoned_threads must be an int, not bool",
        ),
        (
            lambda: ks.EscalationPolicy(grace=-1),
            ValueError,
            "grace must be a finite number of seconds >= 0, got -1",
        ),
        (
            lambda: ks.EscalationPolicy(kill_timeout="5"),  # type: ignore[arg-type]
            TypeError,
            "kill_timeout must be a number of seconds, not str",
        ),
        (
            lambda: ks.Limits(max_duration=0),
            ValueError,
            "max_duration must be a number of seconds > 0, got 0",
        ),
        (lambda: ks.Limits(max_actions=1.5), TypeError, "max_actions must be an int, not float"),
        (lambda: ks.Limits(max_cost=-1), ValueError, "max_cost must be a number >= 0, got -1"),
        (
            lambda: ks.Sentinel(cooldown=math.inf),
            ValueError,
            "cooldown must be a finite number of seconds >= 0, got inf",
        ),
        (lambda: ks.CallRate(0), ValueError, "max_calls must be an int >= 1, got 0"),
        (
            lambda: ks.CallRate(5, window=math.nan),
            ValueError,
            "window must be a finite number > 0, got nan",
        ),
        (lambda: ks.DrillShape(calls=-1), ValueError, "calls must be an int >= 0, got -1"),
        (
            lambda: ks.DrillObjectives(p99_ms=0),
            ValueError,
            "p99_ms must be a finite number > 0, got 0",
        ),
        (
            lambda: ks.SqliteAudit(":memory:", max_batch=0),
            ValueError,
            "max_batch must be an int >= 1, got 0",
        ),
        (
            lambda: ks.SqliteAudit(":memory:", busy_timeout=True),
            TypeError,
            "busy_timeout must be a number of seconds, not bool",
        ),
    ],
)
def test_public_classes_share_the_messages(
    build: object, error: type[Exception], message: str
) -> None:
    """Every public constructor says the same sentence for the same mistake."""
    assert callable(build)
    with pytest.raises(error) as caught:
        build()
    assert str(caught.value) == message


def test_sleep_and_cost_share_the_messages() -> None:
    """ks.sleep and report_cost reject through the same checks."""
    with pytest.raises(ValueError, match=r"^seconds must be a number >= 0, got -1$"):
        ks.sleep(-1)
    with pytest.raises(TypeError, match=r"^seconds must be a number, not bool$"):
        ks.sleep(True)
    with pytest.raises(ValueError, match=r"^actual must be a finite number >= 0, got inf$"):
        ks.report_cost(math.inf)
