"""Teacher provider: load `teacher.checkpoint`, or train the teacher once with its own
recipe and cache it under paths.cache_dir, keyed by a hash of everything that determines
it. Writes are atomic and under a file lock, so parallel sweep jobs train it once."""
import hashlib
import json
import logging
import os
import time
from typing import Tuple

import torch
from filelock import FileLock
from omegaconf import OmegaConf

from kdexp.data import Data
from kdexp.engine.checkpoint import atomic_torch_save
from kdexp.engine.fit import evaluate, fit
from kdexp.errors import ConfigError
from kdexp.methods import Batch, get_method
from kdexp.models import get_model
from kdexp.seeding import derive_seed

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when the teacher training code changes what a recipe produces


class FrozenTeacher:
    """A frozen teacher in eval mode (deliberately not an nn.Module, so that no method or
    optimizer picks up its parameters). `logits(batch)` is what methods call."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        return self.model(batch.x)


def data_fingerprint(data: Data) -> str:
    """Cheap content hash of the training set (a strided sample of x, all of y)."""
    h = hashlib.sha256()
    stride = max(1, len(data.x_train) // 2048)
    for t in (data.x_train[::stride], data.y_train, torch.tensor(data.x_train.shape)):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_key(tcfg, dataset_cfg, data: Data) -> str:
    recipe = {k: OmegaConf.to_container(tcfg, resolve=True)[k]
              for k in ("arch", "args", "epochs", "batch_size", "seed", "optim")}
    ds = {k: v for k, v in OmegaConf.to_container(dataset_cfg, resolve=True).items() if k not in ("root", "download")}
    blob = json.dumps({"v": CACHE_VERSION, "teacher": recipe, "dataset": ds, "data": data_fingerprint(data)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _train(tcfg, data: Data, eval_batch_size: int, progress: bool) -> torch.nn.Module:
    torch.manual_seed(derive_seed(tcfg.seed, "teacher/init"))
    model = get_model(tcfg.arch, data.in_shape, data.num_classes, **tcfg.args).to(data.x_train.device)
    ce = get_method("ce")(OmegaConf.create({"w_ce": 1.0, "alpha": 0.0, "temperature": 1.0}), model)
    log.info("training teacher %s for %d epochs (cached afterwards)", tcfg.arch, tcfg.epochs)
    fit(ce, data, optim_cfg=tcfg.optim, epochs=tcfg.epochs, batch_size=tcfg.batch_size,
        seed=derive_seed(tcfg.seed, "teacher/batches"), eval_batch_size=eval_batch_size,
        progress=progress, desc="teacher")
    return model


def _load_state(path: str, model: torch.nn.Module, what: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"{what}={path!r}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{what}={path!r} is not a readable PyTorch checkpoint: {e}") from None
    state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"{what}={path!r} holds no state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{what}={path!r} does not fit this teacher architecture: "
                          f"{str(e).splitlines()[0]} ...") from None


def provide_teacher(cfg, data: Data) -> Tuple[FrozenTeacher, dict]:
    """-> (frozen teacher, info {source: trained|cache|checkpoint, key, val/acc})."""
    tcfg = cfg.teacher
    device = data.x_train.device
    model = get_model(tcfg.arch, data.in_shape, data.num_classes, **tcfg.args)
    if tcfg.checkpoint:
        _load_state(os.path.expanduser(tcfg.checkpoint), model, "teacher.checkpoint")
        source, key = "checkpoint", os.path.abspath(tcfg.checkpoint)
    else:
        key = teacher_key(tcfg, cfg.dataset, data)
        folder = os.path.join(os.path.expanduser(cfg.paths.cache_dir), "teachers")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{tcfg.arch}-{key}.pt")
        with FileLock(path + ".lock"):  # concurrent jobs wait here while one trains
            if os.path.isfile(path):
                _load_state(path, model, "teacher cache file")
                source = "cache"
            else:
                t0 = time.perf_counter()
                model = _train(tcfg, data, cfg.eval_batch_size, cfg.progress)
                atomic_torch_save({"state_dict": model.state_dict(), "arch": tcfg.arch,
                                   "config": OmegaConf.to_container(tcfg, resolve=True)}, path)
                log.info("teacher trained in %.1fs, cached at %s", time.perf_counter() - t0, path)
                source = "trained"
    model = model.to(device)
    acc = evaluate(model, data.x_val, data.y_val, cfg.eval_batch_size)["acc"]
    log.info("teacher %s (%s): val/acc %.4f", tcfg.arch, source, acc)
    return FrozenTeacher(model), {"source": source, "key": key, "val/acc": acc}
