"""The runner's side of a domain shift (conf/domain, kdexp.data.domain): which view a method
trains on, the config checks that need the method, and the teacher's source/target accuracy.

Conventions (README "Domain shifts"):
- x_train / x_val hold the SOURCE views (the images as loaded); the teacher is trained and
  cached on them, so its cache key is the unshifted data's.
- Methods built for parallel data (train_view = "paired": ts_adapt, ts_adapter, cqd, dann) get
  both views of every sample: batch.x (source) and batch.x_target (target).
- Every other method trains on one view: `domain.train_view` if set, else the method's default
  (source for ce, kd, ...: the "source-only" baseline of domain adaptation; target for finetune
  and progressive, whose point is learning the new domain's labels).
- Evaluation: val/acc is the TARGET view's accuracy; val/acc_source and val/acc_target are both
  logged every epoch, and the teacher's once (teacher/val/acc_source, teacher/val/acc_target;
  teacher/val/acc is then its target accuracy too).
"""
from dataclasses import replace
from typing import Dict

from kdexp.data import Data
from kdexp.errors import ConfigError


def train_view(method_cls, domain_cfg) -> str:
    """source | target | paired: the view `method_cls` trains on under `domain_cfg`."""
    if getattr(method_cls, "train_view", "source") == "paired":
        return "paired"
    chosen = domain_cfg.get("train_view") if domain_cfg is not None else None
    return chosen or getattr(method_cls, "train_view", "source")


def check_method(cfg, method_cls, data: Data) -> None:
    """Method/domain combinations that cannot work, as clear ConfigErrors."""
    name = cfg.method.name
    if getattr(method_cls, "train_view", "source") == "paired" and data.x_train_target is None:
        raise ConfigError(f"method={name} learns from parallel source/target views and needs a domain shift: "
                          f"set domain=vflip (or rotate, lowres, blur, noise, invert, hflip, shift)")
    if cfg.teacher.get("classes") and getattr(method_cls, "teacher_outputs", True):
        raise ConfigError(f"teacher.classes={list(cfg.teacher.classes)} pretrains the teacher on other classes; "
                          f"only methods that start from its weights take that (finetune, progressive), "
                          f"method={name} compares its outputs class by class")


def training_data(data: Data, view: str) -> Data:
    """The Data the fit loop trains on: source (x_train as is, no target view in the batches),
    target (x_train := the target view, cached by the teacher cache under the view name
    "train_target") or paired (both). Validation views are kept: val/acc is the target's."""
    if data.x_train_target is None or view == "paired":
        return data
    if view == "target":
        return replace(data, x_train=data.x_train_target, x_train_target=None, view="train_target")
    return replace(data, x_train_target=None)


def teacher_metrics(teacher, data: Data, batch_size: int) -> Dict[str, float]:
    """The teacher's accuracy on the source and target validation views (empty without a shift)."""
    if teacher is None or data.x_val_target is None:
        return {}
    from kdexp.engine.fit import evaluate

    model = teacher.model
    src = evaluate(model, data.x_val, data.y_val, batch_size)["acc"]
    tgt = evaluate(model, data.x_val_target, data.y_val, batch_size)["acc"]
    return {"val/acc_source": src, "val/acc_target": tgt}
