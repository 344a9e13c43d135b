"""The transformers that is installed is one moslora declares, and it still has the private
Trainer methods that AdapterTrainer relies on (moslora.train.TRAINER_PRIVATE)."""

import inspect
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from transformers import Trainer

from moslora.train import TRAINER_PRIVATE, AdapterTrainer

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def declared(name: str) -> Requirement:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == name)


def test_the_installed_transformers_is_in_the_declared_range():
    requirement = declared("transformers")
    assert any(s.operator == "<" for s in requirement.specifier), "transformers needs an upper bound"
    installed = Version(metadata.version("transformers"))
    assert requirement.specifier.contains(installed, prereleases=True), (installed, requirement)


@pytest.mark.parametrize("name", sorted(TRAINER_PRIVATE))
def test_the_private_trainer_methods_relied_on_still_exist(name):
    method = getattr(Trainer, name, None)
    assert callable(method), f"transformers.Trainer.{name} is gone: AdapterTrainer must follow"
    parameters = list(inspect.signature(method).parameters)[1:]  # after self
    assert parameters[:len(TRAINER_PRIVATE[name])] == list(TRAINER_PRIVATE[name]), (name, parameters)


def test_the_overrides_keep_the_signatures_they_replace():
    for name in ("save_model", "evaluate", "_save_checkpoint", "_load_from_checkpoint", "_load_best_model"):
        ours = list(inspect.signature(getattr(AdapterTrainer, name)).parameters)
        theirs = list(inspect.signature(getattr(Trainer, name)).parameters)
        assert ours == theirs, (name, ours, theirs)
