"""Your own model: `arch` as an import path (mymodels:TinyNet), student=custom / teacher=custom, a
user's config folder on hydra.searchpath with two-line option files, feature taps by module name,
and the torchvision / timm zoos."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from kdexp.errors import ConfigError
from kdexp.models import builder_args, check_model_args, get_model, resolve_builder, skeleton
from tests.conftest import ROOT

MODULE = textwrap.dedent('''
    import math
    import torch.nn as nn


    class TinyNet(nn.Module):
        def __init__(self, in_shape, num_classes, hidden=32):
            super().__init__()
            self.flat = nn.Flatten()
            self.fc1 = nn.Linear(math.prod(in_shape), hidden)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(hidden, num_classes)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(self.flat(x))))


    def make_net(num_classes, width=8):
        return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(4 * width, num_classes))


    def anything(**kwargs):
        return nn.Linear(64, kwargs["num_classes"])


    NOT_A_MODEL = 3


    def not_a_module(num_classes):
        return num_classes
''')


def write_module(folder, name="mymodels"):
    (folder / f"{name}.py").write_text(MODULE)
    return folder


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user module on sys.path under a name of its own (sys.modules caches modules by name)."""
    name = f"mymodels_{abs(hash(str(tmp_path))) % 10 ** 8}"
    write_module(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


# ----------------------------------------------------------------------------------- in process
def test_colon_and_dot_paths_resolve_to_the_same_callable(user_module):
    assert resolve_builder(f"{user_module}:TinyNet") is resolve_builder(f"{user_module}.TinyNet")
    assert resolve_builder("cnn").__name__ == "cnn"


def test_get_model_passes_in_shape_and_num_classes_by_name(user_module):
    net = get_model(f"{user_module}:TinyNet", (1, 8, 8), 10, hidden=5)
    assert net.fc1.in_features == 64 and net.fc1.out_features == 5 and net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    fn = get_model(f"{user_module}.make_net", (1, 8, 8), 7, width=3)  # no in_shape parameter: not given one
    assert fn(torch.zeros(2, 1, 8, 8)).shape == (2, 7) and fn[0].out_channels == 3
    assert get_model(f"{user_module}:anything", (1, 8, 8), 4).out_features == 4  # **kwargs gets both


def test_skeleton_of_an_import_path_is_on_meta(user_module):
    net = skeleton(f"{user_module}:TinyNet", (1, 8, 8), 10, hidden=6)
    assert all(p.is_meta for p in net.parameters()) and net.fc1.out_features == 6


def test_argument_check_uses_the_signature(user_module):
    assert builder_args(f"{user_module}:TinyNet") == ["hidden"]
    assert builder_args(f"{user_module}:anything") is None  # **kwargs: anything goes
    check_model_args(f"{user_module}:anything", {"whatever": 1})
    with pytest.raises(ConfigError, match=r"student.args: model .* has no argument\(s\) \['hiden'\]; valid: \['hidden'\]"):
        check_model_args(f"{user_module}:TinyNet", {"hiden": 3}, key="student.args")


def test_import_errors_are_one_line_and_name_the_path(user_module):
    with pytest.raises(ConfigError) as e:
        resolve_builder("no_such_module_xyz:Net", key="student.arch")
    assert str(e.value) == ("student.arch='no_such_module_xyz:Net': cannot import module 'no_such_module_xyz' (No module "
                            "named 'no_such_module_xyz'); is its folder on PYTHONPATH / the working directory?")
    with pytest.raises(ConfigError, match=r"has no attribute 'TinyNett'\. Did you mean 'TinyNet'\?"):
        resolve_builder(f"{user_module}:TinyNett", key="student.arch")
    with pytest.raises(ConfigError, match="is a int, not a class or function"):
        resolve_builder(f"{user_module}:NOT_A_MODEL")
    with pytest.raises(ConfigError, match=r"returned a int, not an nn.Module"):
        get_model(f"{user_module}:not_a_module", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="unknown model. Did you mean 'cnn'"):  # no dot or colon: the registry
        resolve_builder("cnnn", key="student.arch")
    for e in (str(e.value),):
        assert "\n" not in e


def test_a_module_that_fails_while_importing_names_the_error(tmp_path, monkeypatch):
    (tmp_path / "broken_models_q.py").write_text("raise RuntimeError('oops')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"cannot import module 'broken_models_q' \(RuntimeError: oops\)"):
        resolve_builder("broken_models_q:Net")


def test_plan_accepts_import_paths_and_taps_them_by_module_name(user_module, compose_cfg):
    from kdexp.engine.plan import plan

    cfg = compose_cfg("student=custom", f"student.arch={user_module}:make_net", "+student.args.width=4",
                      "teacher=custom", f"teacher.arch={user_module}.TinyNet", "+teacher.args.hidden=16",
                      "method=fitnet", "method.student_layers=[1]", "method.teacher_layers=[act]")
    p = plan(cfg)
    assert p.describe()["teachers"] == [f"{user_module}.TinyNet"]
    bad = compose_cfg("student=custom", f"student.arch={user_module}:make_net", "method=fitnet",
                      "method.student_layers=[nope]")
    with pytest.raises(ConfigError, match=r"no module\(s\) \['nope'\] to tap.*Tappable modules.*: 0 \(8, 8, 8\), 1 \(8, 8, 8\)"):
        plan(bad)


def test_custom_without_arch_says_what_to_set(compose_cfg):
    from kdexp.engine.plan import plan

    with pytest.raises(ConfigError, match=r"student.arch is not set \(\?\?\?\): give your model's import path"):
        plan(compose_cfg("student=custom"))


def test_args_of_an_empty_args_node_need_plus(compose_cfg):
    """What conf/student/custom.yaml documents: `+student.args.KEY=V` (or ++), not a plain override."""
    from hydra.errors import ConfigCompositionException

    assert compose_cfg("student=custom", "+student.args.hidden=3").student.args == {"hidden": 3}
    assert compose_cfg("student=custom", "++student.args.hidden=3").student.args == {"hidden": 3}
    with pytest.raises(ConfigCompositionException):
        compose_cfg("student=custom", "student.args.hidden=3")


def test_two_line_option_files_on_the_searchpath_get_the_schema(tmp_path, compose_cfg):
    from kdexp.config import validate

    for group in ("student", "teacher"):
        (tmp_path / "cfg" / group).mkdir(parents=True)
        (tmp_path / "cfg" / group / "tiny.yaml").write_text("arch: mymodels:TinyNet\nargs: {hidden: 32}\n")
    cfg = compose_cfg(f"hydra.searchpath=[file://{tmp_path / 'cfg'}]", "student=tiny", "teacher=tiny",
                      "teacher.epochs=3")
    validate(cfg)  # known keys and ranges: the recipe keys are there
    assert cfg.teacher.epochs == 3 and cfg.teacher.batch_size == 64 and cfg.teacher.optim.name == "adam"
    assert cfg.student.args.hidden == 32 and cfg.teacher.checkpoint is None
    (tmp_path / "cfg" / "teacher" / "typo.yaml").write_text("arch: mymodels:TinyNet\nepoch: 3\n")
    with pytest.raises(Exception, match="epoch"):  # a misspelled key of a user's file is refused
        compose_cfg(f"hydra.searchpath=[file://{tmp_path / 'cfg'}]", "teacher=typo")


def test_apply_group_schemas_types_a_hand_built_teacher_node():
    from omegaconf import OmegaConf

    from kdexp.config import apply_group_schemas

    cfg = OmegaConf.create({"teacher": {"arch": "cnn", "args": {}}, "student": {"arch": "mlp"}})
    apply_group_schemas(cfg)
    assert cfg.teacher.epochs == 20 and cfg.teacher.optim.lr > 0 and cfg.student.args == {}
    bad = OmegaConf.create({"teacher": {"arch": "cnn", "epochs": "many"}})
    with pytest.raises(ConfigError, match="teacher: .*many"):
        apply_group_schemas(bad)


def test_the_teacher_cache_key_follows_the_model_source(tmp_path, monkeypatch):
    from kdexp.models import builder_fingerprint

    name = "fingerprinted_models_q"
    write_module(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = builder_fingerprint(f"{name}:TinyNet")
    (tmp_path / f"{name}.py").write_text(MODULE + "\n# edited\n")
    assert before is not None and builder_fingerprint(f"{name}:TinyNet") != before
    assert builder_fingerprint("cnn") is None  # registered models keep their keys
    sys.modules.pop(name, None)


# ----------------------------------------------------------------------------------- zoos
def test_torchvision_resnet18_builds_and_runs_at_cifar_shape():
    net = get_model("torchvision:resnet18", (3, 32, 32), 10)
    net.eval()
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    meta = skeleton("torchvision:resnet18", (3, 32, 32), 10)
    assert all(p.is_meta for p in meta.parameters())


def test_torchvision_on_one_channel_data_adapts_the_first_conv():
    net = get_model("torchvision:resnet18", (1, 8, 8), 10)
    assert net.conv1.in_channels == 1 and net.conv1.out_channels == 64
    net.eval()
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_torchvision_weights_never_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as e:
        get_model("torchvision:resnet18", (3, 32, 32), 10, weights="DEFAULT")
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg and "never downloads" in msg
    with pytest.raises(ConfigError, match="neither a .pth file nor one of DEFAULT, IMAGENET1K_V1"):
        get_model("torchvision:resnet18", (3, 32, 32), 10, weights="IMAGENET")
    with pytest.raises(ConfigError, match="no such file"):
        get_model("torchvision:resnet18", (3, 32, 32), 10, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="torchvision has no model 'resnet181'. Did you mean 'resnet18'"):
        resolve_builder("torchvision:resnet181", key="student.arch")


def test_torchvision_weights_from_a_local_file_and_the_hub_cache(tmp_path, monkeypatch):
    """A state dict of another head size loads all but the head (the fine-tuning case)."""
    src = get_model("torchvision:resnet18", (3, 32, 32), 1000)
    path = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(src.state_dict(), path)
    net = get_model("torchvision:resnet18", (3, 32, 32), 10, weights=str(path))
    assert torch.equal(net.layer1[0].conv1.weight, src.layer1[0].conv1.weight) and net.fc.out_features == 10
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    gray = get_model("torchvision:resnet18", (1, 32, 32), 1000, weights="IMAGENET1K_V1")
    assert torch.allclose(gray.conv1.weight[:, 0], src.conv1.weight.mean(dim=1))
    assert not any(p.is_meta for p in gray.parameters())
    skeleton("torchvision:resnet18", (3, 32, 32), 10, weights="DEFAULT")  # on meta: the file is found, not read


def test_timm_is_optional():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"timm is not installed; pip install timm"):
            resolve_builder("timm:resnet18", key="student.arch")
    else:
        assert get_model("timm:resnet18", (1, 32, 32), 10)(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


# ----------------------------------------------------------------------------------- end to end
def _train(tmp_path, *overrides):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "kdexp.train", *overrides, "progress=false",
                           f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
                           f"paths.data_dir={tmp_path / 'data'}", "hardware.threads=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    return proc, run_dir


def _val_acc(run_dir):
    with open(run_dir / "metrics.json") as f:
        return json.load(f)["val/acc"]


RECIPE = ["epochs=2", "teacher.epochs=3"]


@pytest.mark.slow  # subprocesses end to end (~10 s): with the slow tests
def test_kd_with_your_models_from_the_working_directory(tmp_path):
    write_module(tmp_path)
    proc, run_dir = _train(tmp_path, "student=custom", "student.arch=mymodels:TinyNet", "+student.args.hidden=32",
                           "teacher=custom", "teacher.arch=mymodels.TinyNet", "+teacher.args.hidden=128", *RECIPE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _val_acc(run_dir) > 0.8


@pytest.mark.slow  # a subprocess run (the default run keeps one: test_kd_with_your_models_from_the_working_directory)
def test_kd_with_two_line_option_files_on_the_searchpath(tmp_path):
    write_module(tmp_path)
    for group, hidden in (("student", 32), ("teacher", 128)):
        (tmp_path / "myconf" / group).mkdir(parents=True)
        (tmp_path / "myconf" / group / "tiny.yaml").write_text(f"arch: mymodels:TinyNet\nargs: {{hidden: {hidden}}}\n")
    proc, run_dir = _train(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "student=tiny",
                           "teacher=tiny", *RECIPE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _val_acc(run_dir) > 0.8


@pytest.mark.slow  # a subprocess run (the default run keeps one: test_kd_with_your_models_from_the_working_directory)
def test_fitnet_taps_your_models_by_module_name(tmp_path):
    write_module(tmp_path)
    proc, run_dir = _train(tmp_path, "student=custom", "student.arch=mymodels:make_net", "+student.args.width=4",
                           "teacher=custom", "teacher.arch=mymodels:TinyNet", "method=fitnet",
                           "method.student_layers=[1]", "method.teacher_layers=[act]", "epochs=1", "teacher.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fitnet: student 1 (4, 8, 8) -> teacher act (32,)" in proc.stderr + proc.stdout
    with open(run_dir / "metrics.json") as f:
        assert json.load(f)["status"] == "done"


@pytest.mark.parametrize("overrides, message", [
    (["student.arch=nomodule_here:Net"], "student.arch='nomodule_here:Net': cannot import module 'nomodule_here' "
                                         "(No module named 'nomodule_here'); is its folder on PYTHONPATH"),
    (["student.arch=mymodels:TinyNett"], "student.arch='mymodels:TinyNett': 'mymodels' "),
    (["student.arch=mymodels:not_a_module"], "student.arch 'mymodels:not_a_module' returned a int, not an nn.Module"),
    (["student.arch=mymodels:TinyNet", "+student.args.hiden=3"],
     "student.args: model 'mymodels:TinyNet' has no argument(s) ['hiden']; valid: ['hidden']"),
])
@pytest.mark.slow  # a subprocess run (the default run keeps one: test_kd_with_your_models_from_the_working_directory)
def test_errors_of_your_model_in_a_run(tmp_path, overrides, message):
    write_module(tmp_path)
    proc, run_dir = _train(tmp_path, "student=custom", *overrides, "method=ce", "epochs=1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and message in errors[0], errors


def test_the_readme_module_is_the_one_tested(tmp_path, monkeypatch):
    """The README's "Your own model" module builds both models as the commands there use them."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    code = readme.split("#### Your own model", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "readme_models_q.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert get_model("readme_models_q:TinyNet", (1, 8, 8), 10, hidden=32)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
        assert isinstance(get_model("readme_models_q:make_net", (1, 8, 8), 10, width=4)[1], nn.ReLU)
    finally:
        sys.modules.pop("readme_models_q", None)
