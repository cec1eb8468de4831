"""Evaluation: accuracy and CE of a model on held-out tensors, and the per-epoch validation
metrics of a method (students, the extra models a method evaluates, its own metrics).

Domain shifts (conf/domain): val/acc is the TARGET view's accuracy; val/acc_source and
val/acc_target are both logged, and the teacher's once (teacher/val/acc_source, ...)."""
from dataclasses import replace
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from kdexp.data.stream import batches_of, head


@torch.no_grad()
def evaluate(model: torch.nn.Module, x, y: torch.Tensor, batch_size: int = 1024) -> Dict[str, float]:
    """Accuracy and mean CE of `model` on (x, y), in eval mode; restores the previous mode. x: a
    tensor or streamed inputs (kdexp.data.stream.LazyInputs)."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for sel, xb in batches_of(x, batch_size):  # streamed inputs: read by the loader's workers
        logits = model(xb.to(y.device, non_blocking=True))
        yb = y[sel]
        correct += (logits.argmax(-1) == yb).sum().item()
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
    model.train(was_training)
    return {"acc": correct / len(x), "loss": loss / len(x)}


def validation_metrics(method, data, accel, batch_size: int) -> Dict[str, float]:
    """One epoch's validation metrics of `method`: val/acc and val/loss of its student (on the
    target view with a domain shift, plus val/acc_source and val/acc_target), val/acc_<name> of
    its `eval_models`, and its `extra_metrics`. `accel.evaluate` shards over DDP ranks."""
    x_val = data.x_val if data.x_val_target is None else data.x_val_target
    val = accel.evaluate(method.student, x_val, data.y_val, batch_size)
    out: Dict[str, float] = {}
    if x_val is not data.x_val:
        out["val/acc_source"] = accel.evaluate(method.student, data.x_val, data.y_val, batch_size)["acc"]
        out["val/acc_target"] = val["acc"]
    for name, model in method.eval_models().items():
        out[f"val/acc_{name}"] = accel.evaluate(model, x_val, data.y_val, batch_size)["acc"]
    out.update(method.extra_metrics(data))
    out.update({"val/acc": val["acc"], "val/loss": val["loss"]})
    return out


def test_metrics(method, data, accel, batch_size: int) -> Dict[str, float]:
    """The student's metrics on the test split (dataset.val_from_train), named test/*: what
    validation_metrics measures on the validation split (test/acc, test/loss, test/acc_target, ...)."""
    test = replace(data, x_val=data.x_test, y_val=data.y_test, x_val_target=data.x_test_target)
    return {f"test/{k[len('val/'):]}": v for k, v in validation_metrics(method, test, accel, batch_size).items()
            if k.startswith("val/")}


def limit_validation(data, batches: Optional[int], batch_size: int):
    """`data` with its validation split cut to `batches` batches of `batch_size` (debug.val_batches)."""
    if not batches:
        return data
    n = batches * batch_size
    return replace(data, x_val=head(data.x_val, n), y_val=data.y_val[:n],
                   x_val_target=head(data.x_val_target, n) if data.x_val_target is not None else None)


def teacher_metrics(teacher, data, batch_size: int) -> Dict[str, float]:
    """The teacher's accuracy on the source and target validation views (empty without a shift)."""
    if teacher is None or data.x_val_target is None:
        return {}
    src = evaluate(teacher.model, data.x_val, data.y_val, batch_size)["acc"]
    tgt = evaluate(teacher.model, data.x_val_target, data.y_val, batch_size)["acc"]
    return {"val/acc_source": src, "val/acc_target": tgt}
