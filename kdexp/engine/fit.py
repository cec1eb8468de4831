"""The fit loop shared by students and teachers: in-memory tensors batched by slicing a
seeded permutation, evaluation every epoch, per-epoch metrics to a callback."""
import math
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kdexp.data import Data
from kdexp.engine.optim import build_optimizer, build_scheduler
from kdexp.errors import KdexpError
from kdexp.methods import Batch, Method


class DivergedError(KdexpError):
    pass


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> Dict[str, float]:
    """Accuracy and mean CE of `model` on (x, y), in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        yb = y[i:i + batch_size]
        correct += (logits.argmax(-1) == yb).sum().item()
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
    model.train(was_training)
    return {"acc": correct / len(x), "loss": loss / len(x)}


def fit(method: Method, data: Data, *, optim_cfg, epochs: int, batch_size: int, seed: int,
        eval_batch_size: int = 1024, on_epoch: Optional[Callable[[int, Dict[str, float], dict], None]] = None,
        state: Optional[dict] = None, progress: bool = False, desc: str = "train") -> List[Dict[str, float]]:
    """Train `method.parameters()` for `epochs` epochs; returns the per-epoch metrics.

    Batch order comes from a generator seeded with `seed` alone, so it does not depend on
    what ran before in the process (e.g. whether a teacher was trained or loaded).
    `state` (from a checkpoint) resumes after its last finished epoch; `on_epoch(epoch,
    metrics, state)` gets the state to save after every epoch.
    """
    optimizer = build_optimizer(method.param_groups(optim_cfg), optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, epochs)
    gen = torch.Generator().manual_seed(seed)
    history: List[Dict[str, float]] = []
    start = 0
    if state is not None:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, start = list(state["history"]), state["epoch"]
    n = len(data.x_train)
    steps = math.ceil(n / batch_size)
    show = progress and sys.stdout.isatty()
    method.train()
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(data.x_train.device)
        sums: Dict[str, float] = {}
        bar = tqdm(range(steps), desc=f"{desc} {epoch + 1}/{epochs}", leave=False, disable=not show)
        for step in bar:
            idx = perm[step * batch_size:(step + 1) * batch_size]
            terms = method.losses(Batch(data.x_train[idx], data.y_train[idx], idx))
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                bad = [k for k, v in terms.items() if not torch.isfinite(v)]
                raise DivergedError(f"{desc}: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                                    f"(non-finite term(s): {bad}); lower the learning rate or check the inputs")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            w = len(idx) / n  # epoch means weighted by batch size
            sums["train/loss"] = sums.get("train/loss", 0.0) + loss.item() * w
            for k, v in terms.items():
                sums[f"train/loss_{k}"] = sums.get(f"train/loss_{k}", 0.0) + v.item() * w
            if show and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        scheduler.step()
        train_s = time.perf_counter() - t0
        val = evaluate(method.student, data.x_val, data.y_val, eval_batch_size)
        for name, model in method.eval_models().items():
            sums[f"val/acc_{name}"] = evaluate(model, data.x_val, data.y_val, eval_batch_size)["acc"]
        metrics = {**sums, "val/acc": val["acc"], "val/loss": val["loss"], "lr": optimizer.param_groups[0]["lr"],
                   "time/epoch_s": train_s, "time/samples_per_s": n / train_s}
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics, {
                "epoch": epoch + 1, "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "history": history})
    method.eval()
    return history
