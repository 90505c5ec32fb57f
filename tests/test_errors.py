"""Bad input gets a DualSampleError that is a ValueError and names the argument and row."""

from __future__ import annotations

import re

import dualsample_rs as ds
import numpy as np
import pytest
from dualsample_rs import DualSampleError, InvalidDtypeError, InvalidInputError

IDS = np.array([[1, 2, 3], [4, 5, 6]])
LP = np.log(np.array([[0.5, 0.3, 0.1], [0.4, 0.4, 0.1]]))


def _step(**over: object) -> ds.StepResult:
    args = {"ids_theta": IDS, "logp_theta": LP, "ids_t": IDS, "logp_t": LP}
    cfg = over.pop("config", None)
    args.update(over)
    return ds.step(args["ids_theta"], args["logp_theta"], args["ids_t"], args["logp_t"], config=cfg)


def _with(arr: np.ndarray, row: int, col: int, value: float) -> np.ndarray:
    out = arr.astype(np.result_type(arr, type(value))).copy()
    out[row, col] = value
    return out


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"logp_theta": _with(LP, 1, 2, np.nan)}, r"logp_theta, row 1: column 2 is NaN"),
        ({"logp_t": _with(LP, 0, 0, np.inf)}, r"logp_t, row 0: column 0 is inf"),
        ({"ids_theta": _with(IDS, 1, 0, -5)}, r"ids_theta, row 1: column 0 has negative token id -5"),
        ({"ids_t": _with(IDS, 1, 1, -1)}, r"ids_t, row 1: column 1 is padding"),
        ({"ids_t": _with(IDS, 0, 2, 1)}, r"ids_t, row 0: token id 1 appears twice"),
        ({"logp_theta": LP[:, :2]}, r"logp_theta: shape \[2, 2\] does not match ids_theta's \[2, 3\]"),
        ({"ids_t": IDS[:1], "logp_t": LP[:1]}, r"ids_t: has 1 rows but ids_theta has 2"),
        (
            {
                "ids_theta": np.full((2, 3), -1),
                "logp_theta": np.full((2, 3), -np.inf),
                "ids_t": np.full((2, 3), -1),
                "logp_t": np.full((2, 3), -np.inf),
            },
            r"row 0: both models' lists are empty",
        ),
        ({"config": ds.SamplerConfig(exclude_ids=(4, 5, 6))}, r"exclude_ids, row 1: every candidate"),
        ({"logp_theta": np.zeros((2, 3, 1))}, r"logp_theta: expected a 1-D row or a 2-D batch"),
        (
            {"logp_theta": np.full((2, 3), -np.inf), "logp_t": np.full((2, 3), -np.inf)},
            r"row 0: no candidate has positive probability under either model",
        ),
    ],
)
def test_step_rejects(kwargs: dict, pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern) as info:
        _step(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DualSampleError)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"ids_theta": IDS.astype(np.float64)}, r"ids_theta: expected int32 or int64 token ids, got dtype float64"),
        (
            {"logp_t": LP.astype(np.complex128)},
            r"logp_t: expected float32 or float64 log probabilities, got dtype complex128",
        ),
        ({"logp_t": np.array([["a", "b", "c"]] * 2)}, r"logp_t: expected float32 or float64"),
        ({"ids_t": [[1, 2], [3]]}, r"ids_t: expected int32 or int64 token ids, got an object numpy cannot read"),
    ],
)
def test_step_rejects_dtypes(kwargs: dict, pattern: str) -> None:
    with pytest.raises(InvalidDtypeError, match=pattern) as info:
        _step(**kwargs)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"method": "chernoff"}, r"method: unknown method 'chernoff'|method: unknown method \"chernoff\""),
        ({"missing": "guess"}, r"missing: unknown rule"),
        ({"missing": float("nan")}, r"missing: a constant must be a log probability"),
        ({"missing": [1]}, r"missing: expected \"bound\", \"drop\" or a float, got list"),
        ({"top_p": 0.0}, r"top_p: must lie in \(0, 1\], got 0"),
        ({"top_p": 1.5}, r"top_p: must lie in \(0, 1\]"),
        ({"tol": 0.0}, r"tol: must be a positive finite number"),
        ({"tol": -1e-3}, r"tol: must be a positive finite number"),
        ({"max_iter": 0}, r"max_iter: must be at least 1"),
        ({"alpha_min": 0.8, "alpha_max": 0.2}, r"alpha_min: alpha_min \(0.8\) is greater than alpha_max \(0.2\)"),
        ({"alpha": 1.5}, r"alpha: must lie in \[0, 1\]"),
        ({"temperature": 0.0}, r"temperature: must be a positive finite number"),
        ({"temperature_t": -1.0}, r"temperature_t: must be a positive finite number"),
        ({"exclude_ids": (3, -2)}, r"exclude_ids: token ids are non-negative, got -2"),
        ({"stability_overlap_min": 2.0}, r"stability_overlap_min: must lie in \[0, 1\]"),
        ({"stability_js_max": -0.1}, r"stability_js_max: must be >= 0"),
    ],
)
def test_config_rejects(kwargs: dict, pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern):
        ds.SamplerConfig(**kwargs)


def test_solve_alpha_and_mix_reject() -> None:
    with pytest.raises(InvalidInputError, match=r"logp_t, row 1: column 0 is NaN"):
        ds.solve_alpha(LP, _with(LP, 1, 0, np.nan))
    with pytest.raises(InvalidInputError, match=r"logp_theta, row 0: every entry is -inf"):
        ds.solve_alpha(np.full((1, 3), -np.inf), LP[:1])
    with pytest.raises(InvalidInputError, match=r"logp_t: shape"):
        ds.solve_alpha(LP, LP[:, :2])
    with pytest.raises(InvalidInputError, match=r"method: unknown method"):
        ds.solve_alpha(LP, LP, method="nope")
    with pytest.raises(InvalidInputError, match=r"max_iter: must be at least 1"):
        ds.solve_alpha(LP, LP, max_iter=0)
    with pytest.raises(InvalidInputError, match=r"alpha, row 1: must lie in \[0, 1\], got 2"):
        ds.mix(LP, LP, np.array([0.5, 2.0]))
    with pytest.raises(InvalidInputError, match=r"alpha: expected one entry per row \(2\)"):
        ds.mix(LP, LP, np.array([0.5, 0.5, 0.5]))
    with pytest.raises(InvalidInputError, match=r"alpha, row 0: the two distributions share no candidate"):
        ds.mix(np.array([0.0, -np.inf]), np.array([-np.inf, 0.0]), 0.5)


def test_per_row_arguments_are_checked() -> None:
    with pytest.raises(InvalidInputError, match=r"positions: expected one entry per row \(2\), got shape \[3\]"):
        ds.step(IDS, LP, IDS, LP, positions=[1, 2, 3])
    with pytest.raises(InvalidDtypeError, match=r"force_teacher: expected booleans, one per row"):
        ds.step(IDS, LP, IDS, LP, force_teacher=["yes", "no"])
    with pytest.raises(InvalidInputError, match=r"seed: must be an integer"):
        ds.step(IDS, LP, IDS, LP, seed=2**70)
    with pytest.raises(TypeError):
        ds.step(IDS, LP, IDS, LP, config="fast")  # type: ignore[arg-type]


def test_merge_rejects() -> None:
    with pytest.raises(InvalidInputError, match=r"ids_theta, row 0: token id 2 appears twice"):
        ds.merge_topk(np.array([2, 2]), np.array([-1.0, -2.0]), np.array([1]), np.array([-1.0]))
    with pytest.raises(InvalidInputError, match=r"missing: unknown rule"):
        ds.merge_topk(IDS, LP, IDS, LP, missing="x")


def test_messages_name_the_row_in_a_batch() -> None:
    lp = np.tile(LP[0], (50, 1))
    lp[37, 1] = np.nan
    with pytest.raises(InvalidInputError) as info:
        ds.step(np.tile(IDS[0], (50, 1)), lp, np.tile(IDS[0], (50, 1)), np.tile(LP[0], (50, 1)))
    assert re.search(r"row 37\b", str(info.value))


def test_config_equality_and_repr() -> None:
    a = ds.SamplerConfig(top_p=0.9, exclude_ids=(5, 1, 5), missing=-20.0)
    assert a == ds.SamplerConfig(top_p=0.9, exclude_ids=(1, 5), missing=-20.0)  # ids sorted, deduplicated
    assert a != ds.SamplerConfig(top_p=0.8, exclude_ids=(1, 5), missing=-20.0)
    assert a != "SamplerConfig"
    assert a.exclude_ids == (1, 5) and a.missing == -20.0 and a.temperature_t is None
    assert "top_p=0.9" in repr(a) and "missing=-20.0" in repr(a)


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: ds.step(IDS, np.exp(LP), IDS, LP), r"logp_theta, row 0: column 0 is 0.5, above 0"),
        (lambda: ds.step(IDS, LP, IDS, np.exp(LP)), r"logp_t, row 0: column 0 is 0.5, above 0"),
        (lambda: ds.merge_topk(IDS, LP, IDS, np.exp(LP)), r"logp_t, row 0: column 0 is 0.5"),
        (lambda: ds.SamplerConfig(missing=5.0), r"missing: a constant must be a log probability"),
        (lambda: ds.step(np.array([[2**64 - 1, 2, 3], [4, 5, 6]], dtype=np.uint64), LP, IDS, LP),
         r"ids_theta: 18446744073709551615 does not fit"),
        (lambda: ds.step(np.full((2, 3), -1), np.full((2, 3), -np.inf), IDS, LP),
         r"ids_theta, row 0: the list is empty \(all padding\) while ids_t's is not"),
        (lambda: ds.step(IDS, LP, IDS, LP, positions=[0, -1]), r"positions, row 1: must be >= 0, got -1"),
    ],
)  # fmt: skip
def test_values_that_would_be_silently_wrong_are_refused(call, pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern):
        call()


def test_rounding_just_above_zero_is_accepted() -> None:
    lp = LP.copy()
    lp[0, 0] = 1e-7  # float32 log-softmax of a near-certain token can land here
    assert len(ds.step(IDS, lp, IDS, LP)) == 2


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda: ds.step(IDS, LP, IDS, LP, config="abc"), "config"),
        (lambda: ds.SamplerConfig(temperature="x"), "temperature"),
        (lambda: ds.SamplerConfig(exclude_ids=["a"]), "exclude_ids"),
        (lambda: ds.SamplerConfig(diagnostics="yes"), "diagnostics"),
        (lambda: ds.solve_alpha(LP, LP, tol="x"), "tol"),
        (lambda: ds.step(IDS, LP, IDS, LP, positions=["a", "b"]), "positions"),
    ],
)
def test_type_errors_name_the_argument(call, arg: str) -> None:
    with pytest.raises(TypeError, match=rf"^{arg}: ") as info:
        call()
    assert isinstance(info.value, DualSampleError)
