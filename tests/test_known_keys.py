"""Keys no schema knows are rejected before a run starts (kdexp.config.check_known_keys, the first
step of validate and so of the run plan): Hydra's struct mode stops a misspelled plain override, but
a key added with +/++ or by a config file would otherwise be silently ignored."""
import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from kdexp import config_dir
from kdexp.config import check_known_keys, validate
from kdexp.engine.plan import plan
from kdexp.errors import ConfigError
from tests.conftest import GROUPS, group_options

UNKNOWN = "added with +/++ or by a config file"  # where a key came from when the config cannot tell


def rejected(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    return str(e.value)


@pytest.mark.parametrize("overrides,expected", [
    (["+method.temprature=2"],
     f"method.temprature: unknown key of method=kd ({UNKNOWN}); did you mean method.temperature? "
     "Valid: alpha, beta, logit_standardize, name, temperature, w_ce"),
    (["++method.temprature=2"], "method.temprature: unknown key of method=kd"),
    (["+dataset.foo=1"], f"dataset.foo: unknown key of dataset=digits ({UNKNOWN}). Valid: augment, "),
    (["+seed2=3"], f"seed2: unknown top-level key ({UNKNOWN}); did you mean seed? Valid: batch_size, "),
    (["+teacher.optim.lrr=0.1"], "teacher.optim.lrr: unknown key of teacher.optim ("),
    (["+hardware.thread=1"], "hardware.thread: unknown key of hardware ("),
    (["method=fitnet", "+method.init_optim.lrr=1"], "method.init_optim.lrr: unknown key of method.init_optim ("),
    (["dataset=fake", "+dataset.shap=[1,8,8]"], "dataset.shap: unknown key of dataset=fake ("),
    (["+dataset.num_classes=3"], "dataset.num_classes: unknown key of dataset=digits"),  # a key of dataset=fake only
    (["+student.args.hidden.extra=1", "+method.alpha2=0.5"], "method.alpha2: unknown key of method=kd"),
])
def test_added_unknown_key_is_rejected(compose_cfg, overrides, expected):
    msg = rejected(compose_cfg(*overrides))
    assert msg.startswith(expected), msg
    assert "\n" not in msg  # one key: one line


@pytest.mark.parametrize("overrides,suggestion", [
    (["+teacher.optim.lrr=0.1"], "teacher.optim.lr"), (["+hardware.thread=1"], "hardware.threads"),
    (["method=fitnet", "+method.init_optim.lrr=1"], "method.init_optim.lr"),
    (["dataset=fake", "+dataset.shap=[1,8,8]"], "dataset.shape"), (["+paths.data_dirr=x"], "paths.data_dir"),
    (["+optim.weight_decy=0.1"], "optim.weight_decay"), (["+domain.angel=3"], "domain.angle"),
])
def test_closest_valid_key_is_suggested(compose_cfg, overrides, suggestion):
    assert f"; did you mean {suggestion}? Valid: " in rejected(compose_cfg(*overrides))


@pytest.mark.parametrize("override", ["+student._target_=x", "++student._target_=mymodels.TinyNet",
                                      "+teacher._target_=mymodels.Big"])
def test_target_keys_point_to_arch(compose_cfg, override):
    group = override.lstrip("+").split(".")[0]
    msg = rejected(compose_cfg(override))
    assert msg.startswith(f"{group}._target_: unknown key of {group} ("), msg
    assert f"kdexp builds models by arch, not by Hydra's _target_: {group}.arch=NAME (registered: " in msg
    assert f"or an import path {group}.arch=package.module:Callable, with its keyword arguments under {group}.args" in msg
    assert "resnet20" in msg and msg.endswith("Valid: " + ("arch, args" if group == "student" else
                                                         "arch, args, batch_size, cache, cache_disk, cache_max_gb, cache_topk, "
                                                         "checkpoint, "
                                                         "classes, epochs, labeled_only, optim, seed, stop_at_acc"))


def test_several_unknown_keys_in_one_message(compose_cfg):
    msg = rejected(compose_cfg("+method.temprature=2", "+seed2=3", "+hardware.thread=1"))
    assert "\n" not in msg and msg.startswith("3 unknown config keys: ")
    parts = msg[len("3 unknown config keys: "):].split(" | ")
    assert sorted(part.split(":")[0] for part in parts) == ["hardware.thread", "method.temprature", "seed2"]


def test_run_plan_rejects_before_anything_is_built(compose_cfg):
    with pytest.raises(ConfigError, match=r"^method\.temprature: unknown key of method=kd"):
        plan(compose_cfg("+method.temprature=2"))


def test_key_added_to_a_composed_config(compose_cfg):
    """What a config file adding a key leaves behind, simulated on the composed config."""
    cfg = compose_cfg("method=fitnet")
    OmegaConf.update(cfg, "method.foo", 1, force_add=True)
    OmegaConf.update(cfg, "method.init_optim.foo", {"a": 1}, force_add=True)
    msg = rejected(cfg)
    assert "2 unknown config keys:" in msg
    assert f"method.foo: unknown key of method=fitnet ({UNKNOWN}). Valid: alpha, beta, init_batch_size, " in msg
    assert f"method.init_optim.foo: unknown key of method.init_optim ({UNKNOWN}). Valid: delta, gamma, lr, " in msg


# ------------------------------------------------------------------ config files on the search path
@pytest.fixture
def user_conf(tmp_path):
    """A user's config directory: a method option that does not extend its schema (so Hydra takes
    any key in it) and an experiment preset that selects it and adds a key to it."""
    d = tmp_path / "user_conf"
    (d / "method").mkdir(parents=True)
    (d / "experiment").mkdir()
    (d / "method" / "mykd.yaml").write_text("name: kd\ntemperature: 4.0\nalpha: 0.9\nbeta: 0.0\nw_ce: null\n"
                                            "temprature: 2.0\n")
    (d / "experiment" / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - override /method: mykd\n\n"
                                                "method:\n  alpah: 0.5\n")
    return d


def compose_with_hydra(tmp_path, *overrides):
    """The composed config with its Hydra node, as a running app (or `--cfg job`) has it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=[f"paths.cache_dir={tmp_path / 'cache'}",
                                                f"paths.data_dir={tmp_path / 'data'}", *overrides],
                           return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def test_unknown_key_from_a_user_option_file(compose_cfg, user_conf):
    msg = rejected(compose_cfg(f"hydra.searchpath=[file://{user_conf}]", "method=mykd"))
    assert msg.startswith(f"method.temprature: unknown key of method=kd ({UNKNOWN}); did you mean method.temperature?")


def test_unknown_keys_from_a_preset_name_their_file(tmp_path, user_conf):
    cfg = compose_with_hydra(tmp_path, f"hydra.searchpath=[file://{user_conf}]", "experiment=mine",
                             "+method.beta2=1")
    msg = rejected(cfg)
    option, preset = user_conf / "method" / "mykd.yaml", user_conf / "experiment" / "mine.yaml"
    assert f"method.temprature: unknown key of method=kd (set by method=mykd: {option}); " \
           "did you mean method.temperature?" in msg
    assert f"method.alpah: unknown key of method=kd (set by experiment=mine: {preset}); " \
           "did you mean method.alpha?" in msg
    assert "method.beta2: unknown key of method=kd (added on the command line: +method.beta2=1); " \
           "did you mean method.beta?" in msg


def test_command_line_origin_with_the_hydra_node(tmp_path):
    msg = rejected(compose_with_hydra(tmp_path, "+method.temprature=2"))
    assert msg.startswith("method.temprature: unknown key of method=kd (added on the command line: "
                          "+method.temprature=2); did you mean method.temperature?")
    cfg = compose_with_hydra(tmp_path)
    OmegaConf.update(cfg, "seed2", 1, force_add=True)
    assert rejected(cfg).startswith("seed2: unknown top-level key (not on the command line: added by a config file)")


# ------------------------------------------------------------------------------- what must pass
def test_schema_keys_of_presets_are_rejected_by_hydra_already(compose_cfg, tmp_path):
    """A preset adding a key under a node with a schema fails composition (Hydra); the check covers
    the rest (+/++, options without a schema, configs edited after composition)."""
    from hydra.errors import ConfigCompositionException

    (tmp_path / "c" / "experiment").mkdir(parents=True)
    (tmp_path / "c" / "experiment" / "typo.yaml").write_text("# @package _global_\nmethod:\n  temprature: 2\n")
    with pytest.raises(ConfigCompositionException, match="temprature"):
        compose_cfg(f"hydra.searchpath=[file://{tmp_path / 'c'}]", "experiment=typo")


@pytest.mark.parametrize("group,option", [(g, o) for g in (*GROUPS, "domain") for o in group_options(g)])
def test_every_group_option_passes(compose_cfg, group, option):
    check_known_keys(compose_cfg(f"{group}={option}"))


@pytest.mark.parametrize("preset", group_options("experiment"))
def test_every_experiment_preset_passes(compose_cfg, preset):
    validate(compose_cfg(f"experiment={preset}"))


@pytest.mark.parametrize("preset", group_options("hparams_search"))
def test_hparams_search_presets_pass(compose_cfg, preset):
    validate(compose_cfg(f"hparams_search={preset}"))


def test_default_config_with_its_hydra_node_passes(tmp_path):
    cfg = compose_with_hydra(tmp_path)
    assert "hydra" in cfg
    validate(cfg)


def test_free_form_nodes_are_not_checked_here(compose_cfg):
    """Fields typed Any/Dict/List: their consumers check them (the model builder for args, the run
    plan for teachers, the domain and method code for transforms and tasks)."""
    validate(compose_cfg("+student.args.anything=1", "+teacher.args.whatever=2",
                         "teachers=[cnn,{base: cnn, seed: 1, anything: 3}]", "domain=rotate",
                         "domain.transforms=[{name: rotate, angle: 30}]"))
    cfg = compose_cfg("domain=rotate", "domain.transforms=[{name: rotate, angle: 30, extra: 1}]")
    check_known_keys(cfg)
    with pytest.raises(ConfigError, match=r"domain\.transforms\[0\]: transform 'rotate' has no parameter"):
        validate(cfg)  # the domain code names it
    check_known_keys(compose_cfg("method=multitask", "method.tasks=[{name: a, labels: [0, 1], anything: 1}]"))
    check_known_keys(compose_cfg("method=data_distill", "method.transforms=[none,{name: shift, dx: 1, anything: 1}]"))


def test_interpolated_nodes_are_checked_where_they_live(compose_cfg):
    cfg = compose_cfg()
    OmegaConf.update(cfg, "teacher.optim", "${optim}", merge=False)
    check_known_keys(cfg)
    OmegaConf.update(cfg, "optim.foo", 1, force_add=True)
    assert rejected(cfg).startswith("optim.foo: unknown key of optim (")


def test_the_walk_is_fast(compose_cfg):
    cfg = compose_cfg("method=fitnet")
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        check_known_keys(cfg)
    assert (time.perf_counter() - t0) / n < 0.01  # ~0.1 ms on a laptop core; a loose bound for shared machines

