"""Models. A model builder takes (in_shape, num_classes, **args) and returns an nn.Module that
maps a batch of inputs to logits; in_shape comes from the dataset, so every model runs on every
dataset. Features are tapped by module name (kdexp.models.taps). `arch` may also be a zoo model
(torchvision:NAME, timm:NAME) or the import path of a user's callable (kdexp.models.registry)."""
from kdexp.models.registry import (MODELS, builder_args, builder_fingerprint, check_model_args, get_model, list_models,  # noqa: F401
                                   rebuild, register_model, resolve_builder, skeleton)
from kdexp.models.taps import feature_kind  # noqa: F401
from kdexp.models import classic, cifar  # noqa: E402,F401  (register the models)
