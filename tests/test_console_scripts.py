"""Every console script pyproject.toml declares (kdexp-train, kdexp-summarize, kdexp-plot, kdexp-list)
names a function that exists, and the reporting ones answer --help: an installed kdexp has working
commands, not entry points into modules that moved."""
import importlib
import os
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    SCRIPTS = tomllib.load(f)["project"]["scripts"]


def test_the_reporting_commands_are_declared():
    assert {"kdexp-train", "kdexp-summarize", "kdexp-plot", "kdexp-list"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_console_script_names_a_callable(name):
    module, _, function = SCRIPTS[name].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("name", ["kdexp-summarize", "kdexp-plot"])
def test_a_reporting_command_answers_help(name, capsys):
    module, _, function = SCRIPTS[name].partition(":")
    with pytest.raises(SystemExit) as stop:
        getattr(importlib.import_module(module), function)(["--help"])
    assert stop.value.code == 0 and "usage:" in capsys.readouterr().out
