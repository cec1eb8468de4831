"""The model registry: builders by name, built for real (`get_model`) or as meta-device
skeletons (`skeleton`).

`arch` is a registered name (`cnn`), a model zoo (`torchvision:resnet18`, `timm:NAME`,
kdexp.models.zoo), or the import path of a user's callable (`mymodels:TinyNet` or
`mymodels.TinyNet`): a class or function returning an nn.Module, called with `in_shape` and/or
`num_classes` when its signature names them, plus the config's `args` as keyword arguments. Import
paths are imported with importlib from sys.path: `python -m kdexp.train` puts the working directory
first on it (and Hydra does not change directory: hydra.job.chdir is off under version_base 1.3),
so a `mymodels.py` next to where the run starts is found."""
import difflib
import hashlib
import importlib
import inspect
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from kdexp.errors import ConfigError
from kdexp.registry import Registry

MODELS = Registry("model")
register_model = MODELS.register
list_models = MODELS.names

ZOOS = ("torchvision", "timm")  # `zoo:NAME` archs (kdexp.models.zoo), not import paths


def is_import_path(arch: str) -> bool:
    """Whether `arch` names a callable by import path (or a zoo model) rather than a registered name:
    registered names have neither a dot nor a colon."""
    return isinstance(arch, str) and (":" in arch or "." in arch)


def _split_path(arch: str) -> Tuple[str, str]:
    """'pkg.mod:Obj' or 'pkg.mod.Obj' -> ('pkg.mod', 'Obj'); the attribute may be dotted after ':'."""
    module, sep, attr = arch.partition(":")
    if not sep:
        module, _, attr = arch.rpartition(".")
    if not module or not attr:
        raise ConfigError(f"{arch!r} is not an import path: write package.module:Callable (or package.module.Callable)")
    return module, attr


def _where(arch: str, key: str) -> str:
    return f"{key}={arch!r}" if key else f"arch {arch!r}"


def _import(arch: str, key: str) -> Callable:
    """The callable an import path names; one-line ConfigErrors for a module that does not import,
    a missing attribute, or something that cannot be called."""
    module_name, attr = _split_path(arch)
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or the user's module failing while it imports
        reason = str(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {e}"
        raise ConfigError(f"{_where(arch, key)}: cannot import module {module_name!r} ({reason}); is its folder on "
                          f"PYTHONPATH / the working directory?") from None
    owner = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"{_where(arch, key)}: {owner!r} ({getattr(obj, '__file__', None) or 'no file'}) has no "
                              f"attribute {part!r}.{hint} It defines: {', '.join(names[:20]) or 'nothing'}")
        obj, owner = getattr(obj, part), f"{owner}.{part}"
    if not callable(obj):
        raise ConfigError(f"{_where(arch, key)} is a {type(obj).__name__}, not a class or function that returns an "
                          f"nn.Module")
    return obj


def resolve_builder(arch: str, key: str = "") -> Callable:
    """The callable behind `arch` (a registered builder, a zoo's, or an imported one); `key` (e.g.
    "student.arch") names the config key in errors. A name with neither dot nor colon is looked up in
    the registry (unknown: the registered names and the closest)."""
    if not is_import_path(arch):
        return MODELS.get(arch, key=key)
    zoo, sep, name = arch.partition(":")
    if sep and zoo in ZOOS:
        from kdexp.models import zoo as zoos  # torchvision/timm are imported only when a zoo model is asked for

        return zoos.builder(zoo, name, key)
    return _import(arch, key)


def builder_fingerprint(arch: str) -> Optional[str]:
    """For an import path: a hash of the file that defines its callable (for a zoo: the zoo's version),
    so a teacher cached under the same arch and args is retrained after the user edits the model's
    code; None for registered names (their cache keys stay as they were)."""
    if not is_import_path(arch):
        return None
    zoo, sep, _ = arch.partition(":")
    if sep and zoo in ZOOS:
        return f"{zoo}=" + importlib.import_module(zoo).__version__
    fn = resolve_builder(arch)
    try:
        path = inspect.getsourcefile(fn)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except (TypeError, OSError):  # a builtin or a module without a source file: the path alone keys it
        return None


def _signature(fn: Callable) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return None


def builder_args(arch: str, key: str = "") -> Optional[List[str]]:
    """The keyword arguments `args` may set for `arch` (in_shape and num_classes come from the data),
    or None when its builder takes **kwargs (anything goes; the builder checks)."""
    sig = _signature(resolve_builder(arch, key))
    if sig is None:
        return None
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in ("in_shape", "num_classes")
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_model_args(name: str, args: dict, key: str = "") -> None:
    """Unknown keyword arguments of model `name` fail naming them and the valid ones (`key`, e.g.
    "student.args", names the config node in the message)."""
    valid = builder_args(name, key[:-len(".args")] + ".arch" if key.endswith(".args") else "")
    if valid is None:
        return
    unknown = sorted(set(args) - set(valid))
    if unknown:
        where = f"{key}: " if key else ""
        hint = "" if not is_import_path(name) or not key else (
            f" (args left from another option? {key.split('.')[0]}=custom starts from empty args)")
        raise ConfigError(f"{where}model {name!r} has no argument(s) {unknown}; valid: {valid or 'none'}{hint}")


def _call(arch: str, fn: Callable, in_shape: Tuple[int, ...], num_classes: int, args: dict) -> nn.Module:
    """Registered builders take (in_shape, num_classes, **args) positionally; an imported callable gets
    in_shape / num_classes only when its signature names them (or takes **kwargs)."""
    if not is_import_path(arch):
        return fn(in_shape, num_classes, **args)
    sig = _signature(fn)
    params = sig.parameters if sig is not None else {}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    given = {k: v for k, v in (("in_shape", in_shape), ("num_classes", num_classes))
             if (k in params or var_kw) and k not in args}
    return fn(**given, **args)


@dataclass(frozen=True)
class BuildSpec:
    """How `get_model` built a model: enough to build another instance of it (`rebuild`)."""
    arch: str
    in_shape: Tuple[int, ...]
    num_classes: int
    args: Dict[str, Any]


BUILD_SPEC = "_kdexp_build"  # the attribute of a built model that holds its BuildSpec


def get_model(name: str, in_shape: Tuple[int, ...], num_classes: int, **args) -> nn.Module:
    """Build model `name` (registered, zoo or import path); unknown keyword arguments fail naming the
    valid ones, and a callable that returns no nn.Module fails naming what it returned. The model
    records how it was built (its BuildSpec), so that `rebuild` can make fresh instances of it."""
    check_model_args(name, args)
    model = _call(name, resolve_builder(name), tuple(in_shape), num_classes, args)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"arch {name!r} returned a {type(model).__name__}, not an nn.Module: it must be an nn.Module "
                          f"class or a function that returns one")
    setattr(model, BUILD_SPEC, BuildSpec(name, tuple(in_shape), num_classes, dict(args)))
    return model


def rebuild(model: nn.Module, what: str = "model") -> nn.Module:
    """A new instance of `model`'s architecture, built again by its builder with the arch, in_shape,
    num_classes and args `get_model` built it with, so it is initialized as the architecture
    initializes itself (its own init code, e.g. kaiming for the CIFAR ResNets; a builder that loads
    pretrained weights loads them again), drawing from the global RNG now. It goes to the device of
    `model`'s first parameter (or buffer). A model that `get_model` did not build (a deepcopy of one
    is fine) has no recipe to rebuild from: a ConfigError naming `what`."""
    spec = getattr(model, BUILD_SPEC, None)
    if not isinstance(spec, BuildSpec):
        raise ConfigError(f"{what}: {type(model).__name__} was not built by kdexp.models.get_model, so a fresh "
                          f"instance of its architecture cannot be built; build it with get_model(arch, in_shape, "
                          f"num_classes, **args) (arch: a registered name or an import path package.module:Callable)")
    fresh = get_model(spec.arch, spec.in_shape, spec.num_classes, **spec.args)
    if fresh is model:
        raise ConfigError(f"{what}: arch {spec.arch!r} returned the same module instance again; its builder must "
                          f"construct a new model on every call")
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return fresh.to(tensor.device) if tensor is not None else fresh


def skeleton(name: str, in_shape: Tuple[int, ...], num_classes: int, **args) -> nn.Module:
    """`get_model(...)` built on the meta device: the real model's modules, parameter shapes and
    default feature layers, with no memory and no initialization cost, so a run plan can check
    layer names and feature shapes (kdexp.models.taps.feature_shapes / list_features run a meta
    zero batch through it) before anything is trained. The global RNG is left as it was: a plan
    that builds skeletons before a seeded run changes none of its draws. Unknown names and
    arguments raise as get_model does. Every registered model builds and runs on meta with the
    shapes of the real one (tests/test_signatures.py), so none needs a CPU fallback."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return get_model(name, in_shape, num_classes, **args)
