"""A method registered in one place (greencore.registry) is a choice everywhere: the API's schema and
validation, the CLI's options, the dashboard's list (read from the schema), and greencore's own check."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from api.app import create_app
from api.cli import build_parser
from api.config import Settings
from api.schemas.jobs import JobCreate
from greencore.methods import FullMethod, make_method
from greencore.registry import METHODS, MethodError, MethodInfo, register_method
from greencore.spec import DEFAULT_RHO, Hyperparameters, SpecError, TrainSpec

NEW = MethodInfo(
    "fullcopy", "Full again", "a test method: trains every tensor", False, f"{__name__}:FullCopy"
)


class FullCopy(FullMethod):
    """A method defined outside greencore, for the test."""


@pytest.fixture
def registered() -> Iterator[MethodInfo]:
    register_method(NEW)
    try:
        yield NEW
    finally:
        METHODS.pop(NEW.name)


def test_a_registered_method_is_offered_everywhere(registered: MethodInfo, tmp_path) -> None:
    schema = create_app(Settings(data_dir=tmp_path)).openapi()["components"]["schemas"]
    method = schema["JobMethod"]["properties"]["type"]
    assert registered.name in method["enum"]
    listed = {m["name"]: m for m in method["x-methods"]}
    assert listed[registered.name] == {
        "name": "fullcopy",
        "title": "Full again",
        "summary": "a test method: trains every tensor",
        "budgeted": False,
    }
    job = JobCreate(model="m", training_file="file-x", method={"type": "fullcopy"})
    assert job.method_type == "fullcopy"

    args = build_parser().parse_args(
        ["estimate", "--model", "m", "--training-file", "f", "--method", "fullcopy"]
    )
    assert args.method == "fullcopy"

    assert isinstance(make_method("fullcopy", Hyperparameters()), FullCopy)
    TrainSpec("m", "t", "o", method="fullcopy").check()


def test_an_unknown_method_is_refused_everywhere(capsys) -> None:
    with pytest.raises(ValidationError, match="unknown method 'sparse'; one of supervised, green, full"):
        JobCreate(model="m", training_file="file-x", method={"type": "sparse"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["estimate", "--model", "m", "--training-file", "f", "--method", "sparse"])
    assert "invalid choice: 'sparse'" in capsys.readouterr().err
    with pytest.raises(MethodError, match="unknown method"):
        make_method("sparse", Hyperparameters())
    with pytest.raises(SpecError, match="method"):
        TrainSpec("m", "t", "o", method="sparse").check()
    with pytest.raises(MethodError, match="registered already"):
        register_method(METHODS["green"])


def test_a_method_refuses_a_budget_it_cannot_take() -> None:
    for name in ("full", "lora"):
        with pytest.raises(SpecError, match=f"apply to methods green and topk, not {name}"):
            make_method(name, Hyperparameters(rho=0.5)).check()
    with pytest.raises(SpecError, match="topk takes topk_layers or a budget"):
        make_method("topk", Hyperparameters(topk_layers=1, max_flops=1e12)).check()
    assert make_method("green", Hyperparameters()).rho == DEFAULT_RHO
    assert make_method("supervised", Hyperparameters()).info.name == "green"  # OpenAI's name for the default
    assert make_method("topk", Hyperparameters(topk_layers=2)).rho is None
