"""`python -m kdexp.train --help` (kdexp's hydra/help, kdexp.catalog) and the listings of
`python -m kdexp.catalog`: built from the registries and conf/, so these tests read both to say what
must appear."""
import dataclasses
import inspect
import os
import subprocess
import sys

import pytest

from kdexp import catalog, config_dir
from kdexp.config import Config
from kdexp.methods import METHODS
from tests.conftest import ROOT


def _run(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


@pytest.fixture(scope="module")
def help_out():
    p = _run("kdexp.train", "--help")
    assert p.returncode == 0, p.stderr
    return p.stdout


def _conf_folders():
    """The folders of conf/ but Hydra's own (hydra/launcher, sweeper), listed here independently of kdexp.catalog."""
    conf = config_dir()
    return sorted(d for d in os.listdir(conf) if os.path.isdir(os.path.join(conf, d)) and d not in ("hydra", "sweeper"))


def test_help_lists_every_method_with_its_description(help_out):
    lines = help_out.splitlines()
    for name in METHODS.names():
        description = METHODS.meta(name)["description"]
        assert any(line.split() and line.split()[0] == name and line.endswith(description) for line in lines), name


def test_help_lists_every_conf_group_and_no_schema_group(help_out):
    lines = help_out.splitlines()
    for group in _conf_folders():
        assert any(line.split() and line.split()[0] == group for line in lines), group
    assert [line for line in lines if "schema/" in line] == []


def test_help_keeps_hydras_flags_and_dumps_no_config(help_out):
    assert "--cfg,-c : Show config instead of running" in help_out  # $FLAGS_HELP
    assert "--cfg job" in help_out  # how to print the config instead
    for key in ("val_fraction:", "split_seed:", "eval_batch_size: 1024"):  # lines of the composed config's YAML
        assert key not in help_out


def test_help_says_how_to_see_a_methods_keys(help_out):
    """The command --help gives for a method's keys and defaults works and prints them."""
    line = next(line for line in help_out.splitlines() if "--package method" in line)
    command = line.split("python -m ", 1)[1].split("--package method")[0].split() + ["--package", "method"]
    p = _run(*command)
    assert p.returncode == 0, p.stderr
    assert "name: dkd" in p.stdout and "warmup_epochs: 20" in p.stdout and "dataset" not in p.stdout


def test_catalog_methods_one_line_each():
    p = _run("kdexp.catalog", "methods")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert [line.split()[0] for line in lines] == METHODS.names()
    kd = lines[METHODS.names().index("kd")]
    assert "teacher=outputs" in kd and "fusable" in kd and kd.endswith(METHODS.meta("kd")["description"])


def test_catalog_unknown_kind_exits_2_naming_the_kinds(capsys):
    assert catalog.main(["method"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "'method'" in err and all(k in err for k in catalog.KINDS)
    assert catalog.main(["methods", "models"]) == 2


@pytest.mark.parametrize("kind", ["models", "datasets", "groups"])
def test_catalog_lists_each_entry_once(kind, capsys):
    from kdexp.data import DATASETS
    from kdexp.models import MODELS

    expected = {"models": MODELS.names(), "groups": catalog.config_groups(config_dir()),
                "datasets": sorted(set(DATASETS.names()) | set(catalog.group_options(config_dir(), "dataset")))}[kind]
    assert catalog.main([kind]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == expected
    assert all(len(line.split()) > 1 for line in lines)  # each with its description / options


def test_every_method_has_a_one_line_description():
    for name in METHODS.names():
        description = METHODS.meta(name)["description"]
        first_line = inspect.getdoc(METHODS.get(name)).splitlines()[0]
        assert description == first_line and 10 <= len(description) <= 100, (name, description)


def test_every_config_field_has_a_help_description():
    groups = set(catalog.config_groups(config_dir()))
    fields = {f.name for f in dataclasses.fields(Config)}
    assert sorted(f for f in fields - groups if not catalog.RUN_KEYS.get(f)) == []
    assert sorted(set(catalog.RUN_KEYS) - fields) == []  # no description of a key that is gone


def test_a_new_conf_folder_appears_in_help_without_editing_it(tmp_path):
    """Groups are read from conf/ when the help is built: a folder added by another change shows up."""
    (tmp_path / "logger").mkdir()
    (tmp_path / "logger" / "tensorboard.yaml").write_text("name: tensorboard\n")
    (tmp_path / "config.yaml").write_text("defaults:\n  - logger: tensorboard\n  - override hydra/help: kdexp\n")
    text = catalog.help_text(Config, str(tmp_path))
    assert "  logger  tensorboard (default)" in text.splitlines()
