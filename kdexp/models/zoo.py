"""Model zoos as archs: `torchvision:NAME` (any name torchvision.models.list_models() lists) and
`timm:NAME` (when timm is installed: pip install kdexp[timm]).

torchvision models are built with `torchvision.models.get_model(NAME, num_classes=..., **args)`.
`args.weights` loads pretrained weights and never downloads: a path to a local .pth state dict, or
`DEFAULT` / an enum name of the model's weights (e.g. IMAGENET1K_V1) read from the torch hub cache
(`torch.hub.get_dir()/checkpoints/<file>`, where torchvision's own download puts them). Tensors whose
shape differs from the model's (the classifier head when num_classes is not the weights' 1000) are
left as initialized. torchvision models expect 3 input channels: for other data (1-channel digits,
MNIST) the first conv is replaced by one with the data's channels, its weights the mean over the
pretrained RGB filters (so a pretrained stem sees a gray image as it saw a gray RGB one).
"""
import logging
import os
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from kdexp.errors import ConfigError

log = logging.getLogger(__name__)


def builder(zoo: str, name: str, key: str = "") -> Callable:
    """The builder `(in_shape, num_classes, **args) -> nn.Module` of `zoo:name`."""
    where = f"{key}={zoo}:{name}" if key else f"arch {zoo}:{name}"
    return _torchvision(name, where) if zoo == "torchvision" else _timm(name, where)


def _torchvision(name: str, where: str) -> Callable:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"{where}: torchvision has no model {name!r}.{hint} See torchvision.models.list_models()")

    def build(in_shape: Tuple[int, ...], num_classes: int, weights: Optional[str] = None, **args) -> nn.Module:
        path = _weights_file(name, weights, where) if weights else None
        model = torchvision.models.get_model(name, num_classes=num_classes, **args)
        if path is not None and not _is_meta(model):  # a skeleton only checks that the file is there
            _load_matching(model, torch.load(path, map_location="cpu", weights_only=True), path)
        return _adapt_first_conv(model, in_shape[0], where)

    build.__name__ = f"torchvision_{name}"
    return build


def _weights_file(name: str, weights: str, where: str) -> str:
    """The local file `args.weights` names: a path as given, or an enum name's file in the hub cache."""
    if os.sep in weights or weights.endswith((".pth", ".pt")):
        if not os.path.isfile(weights):
            raise ConfigError(f"{where}: args.weights={weights!r}: no such file")
        return weights
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    choices = ["DEFAULT"] + [w.name for w in enum]
    if weights not in choices:
        raise ConfigError(f"{where}: args.weights={weights!r} is neither a .pth file nor one of {', '.join(choices)}")
    url = enum[weights].url if weights != "DEFAULT" else enum.DEFAULT.url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: args.weights={weights}: {path} is not in the local torch hub cache (kdexp never "
                          f"downloads); fetch {url} there on a machine online, or give args.weights=PATH.pth")
    return path


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _load_matching(model: nn.Module, state: dict, path: str) -> None:
    """Load the tensors of `state` whose names and shapes the model has; log what was left out."""
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(fitting))
    model.load_state_dict(fitting, strict=False)
    if skipped:
        log.info("weights %s: %d tensor(s) not loaded (absent or another shape): %s", path, len(skipped),
                 ", ".join(skipped[:6]))


def _adapt_first_conv(model: nn.Module, channels: int, where: str) -> nn.Module:
    """Replace the first Conv2d when its input channels are not the data's (see the module docstring)."""
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            if conv.in_channels == channels:
                return model
            if conv.groups != 1:
                raise ConfigError(f"{where}: its first conv ({name}) is grouped and takes {conv.in_channels} channels; "
                                  f"the data has {channels}")
            new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                            bias=conv.bias is not None, padding_mode=conv.padding_mode, device=conv.weight.device)
            with torch.no_grad():
                new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            return model
    return model


def _timm(name: str, where: str) -> Callable:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"{where}: timm is not installed; pip install timm (or pip install kdexp[timm])") from None
    if name not in timm.list_models():
        raise ConfigError(f"{where}: timm has no model {name!r}; see timm.list_models()")

    def build(in_shape: Tuple[int, ...], num_classes: int, **args) -> nn.Module:
        return timm.create_model(name, num_classes=num_classes, in_chans=in_shape[0], pretrained=False, **args)

    build.__name__ = f"timm_{name}"
    return build
