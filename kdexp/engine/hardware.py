"""Hardware: CPU threads per process, the device, CUDA options and DDP.

- Threads (`hardware.threads`, 0 = auto): processes that share the machine's cores get
  cores / processes each: joblib's `n_jobs`, submitit's `cpus_per_task` (or SLURM's
  SLURM_CPUS_PER_TASK), torchrun's local ranks. A single run keeps torch's default.
- CUDA (`hardware=cuda`): autocast with `amp=bf16|fp16` (fp16 with a GradScaler), channels-last
  models and inputs, `torch.compile` of the student (`nn.Module.compile`, so state_dict keys do
  not change), the dataset resident on the GPU (copied once from pinned memory with
  non_blocking), and no per-step host syncs in the fit loop (loss sums stay on the GPU;
  divergence is checked every `sync_every` steps). None of it applies on the CPU.
- DDP (`hardware=ddp`, launched with `torchrun`): every rank draws the same global batch order,
  takes its contiguous shard of each global batch, and gradients are all-reduced weighted by
  shard size, so the update equals one process's update on the whole batch (for losses that are
  batch means). Training loss sums and validation counts are all-reduced; only rank 0 writes
  metrics.json, TensorBoard, checkpoints and the run info.
"""
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from kdexp.data.stream import batches_of
from kdexp.engine.dot import DOT
from kdexp.engine.evaluate import evaluate
from kdexp.errors import ConfigError

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------- threads
def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _launcher_config():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().launcher
    except Exception:  # no Hydra context (run() called directly, tests, scripts)
        return None


def parallel_share(cores: Optional[int] = None) -> Tuple[Optional[int], str]:
    """(threads per process, why) when this process shares the cores with others; (None, why)
    when it has the machine to itself."""
    cores = cores or cpu_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]) // local_world), "SLURM_CPUS_PER_TASK"
    launcher = _launcher_config()
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    if "joblib" in target:
        n_jobs = int(launcher.get("n_jobs", -1) or -1)
        jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 all cores, -2 all but one
        return max(1, cores // (jobs * local_world)), f"joblib n_jobs={n_jobs}"
    if "submitit" in target:
        cpus = launcher.get("cpus_per_task")
        if cpus:
            return max(1, int(cpus) // local_world), f"submitit cpus_per_task={cpus}"
        # submitit_local starts all jobs of a batch at once; their number is not known here
        return 1, "submitit without cpus_per_task (set hydra.launcher.cpus_per_task)"
    if local_world > 1:
        return max(1, cores // local_world), f"torchrun LOCAL_WORLD_SIZE={local_world}"
    return None, "single process"


def apply_threads(hw) -> int:
    """Set torch's intra-op threads for this process from `hardware.threads` (0: auto)."""
    if hw.threads > 0:
        torch.set_num_threads(hw.threads)
        return hw.threads
    threads, why = parallel_share()
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("torch threads: %d (%s; hardware.threads sets it)", threads, why)
    return torch.get_num_threads()


# ----------------------------------------------------------------------------------- DDP
@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch of indices (sizes differ by at most 1)."""
        if not self.active:
            return idx
        return idx.tensor_split(self.world)[self.rank]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


SINGLE = DistContext()


def select_device(hw, dist: DistContext = SINGLE) -> torch.device:
    """The run's device from `hardware` (auto: the GPU when torch sees one); also sets the CPU
    threads (hardware.threads, or cores / parallel processes: joblib, submitit, torchrun)."""
    apply_threads(hw)
    if hw.device == "cpu":
        return torch.device("cpu")
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"hardware=cuda but no GPU is available to torch {torch.__version__} "
                          f"(CUDA build: {torch.version.cuda}); use hardware=cpu or hardware=auto")
    if hw.device == "cuda" or torch.cuda.is_available():
        if hw.device_index >= torch.cuda.device_count():
            raise ConfigError(f"hardware.device_index={hw.device_index} but only "
                              f"{torch.cuda.device_count()} GPU(s) are visible")
        # DDP: one GPU per local rank (hardware.device_index offsets them)
        return torch.device("cuda", hw.device_index + (dist.local_rank if dist.active else 0))
    return torch.device("cpu")


def init_distributed(hw) -> DistContext:
    """The process group of a `hardware=ddp` run started by torchrun (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT in the environment); SINGLE otherwise."""
    if not hw.get("distributed", False):
        return SINGLE
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError("hardware=ddp runs one training across processes started by torchrun, e.g. "
                          "torchrun --nproc_per_node=2 -m kdexp.train hardware=ddp; RANK/WORLD_SIZE are not set")
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = hw.get("backend", "auto")
        if backend == "auto":
            backend = "nccl" if hw.device != "cpu" and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(hw.device_index + ctx.local_rank)
        dist.init_process_group(backend=backend)
        log.info("DDP: rank %d of %d (local rank %d), backend %s", ctx.rank, ctx.world, ctx.local_rank, backend)
    if not ctx.is_main:  # only rank 0 logs progress (warnings and errors still show)
        logging.getLogger("kdexp").setLevel(logging.WARNING)
    return ctx


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------- accelerator
class Accelerator:
    """Device-specific parts of the fit loop. The default (CPU, one process) changes nothing:
    no autocast, plain backward/step, host-side loss sums checked every step."""

    def __init__(self, device: torch.device = torch.device("cpu"), hw=None, dist: DistContext = SINGLE):
        self.device = torch.device(device)
        self.dist = dist
        cuda = self.device.type == "cuda"
        amp = (hw.get("amp", "none") if hw is not None else "none") or "none"
        if amp not in ("none", *AMP_DTYPES):
            raise ConfigError(f"hardware.amp={amp!r}; one of none, bf16, fp16")
        if amp != "none" and not cuda:
            if hw.device == "cpu":
                raise ConfigError(f"hardware.amp={amp} needs a GPU (hardware=cuda); the CPU path runs in float32")
            log.warning("hardware.amp=%s ignored: no GPU, running in float32 on the CPU", amp)
            amp = "none"
        self.amp_dtype = AMP_DTYPES.get(amp) if cuda else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None
        self.channels_last = bool(cuda and hw is not None and hw.get("channels_last", False))
        self.compile = bool(hw is not None and hw.get("compile", False))
        self.non_blocking = bool(cuda and (hw is None or hw.get("non_blocking", True)))
        # host syncs: every step on the CPU (exact step in the divergence error), every N on a GPU
        self.sync_every = 1 if not cuda else max(1, int(hw.get("sync_every", 50) if hw is not None else 50))

    # -- setup ---------------------------------------------------------------------------------
    def data_to_device(self, data):
        """The dataset's tensors on the device, once (on a GPU: from pinned memory, non_blocking;
        channels_last image inputs with hardware.channels_last). They stay there: batches are
        gathered on the device, with no per-step host-to-device copies."""
        if self.device.type != "cuda":
            return data.to(self.device)
        from dataclasses import replace

        names = [k for k in getattr(data, "TENSORS", ("x_train", "y_train", "x_val", "y_val", "labeled"))
                 if isinstance(getattr(data, k, None), torch.Tensor)]  # streamed inputs stay on the host
        moved = {}
        for k in names:
            t = getattr(data, k)
            if self.non_blocking and t.device.type == "cpu":
                t = t.pin_memory().to(self.device, non_blocking=True)
            else:
                t = t.to(self.device)
            if self.channels_last and t.dim() == 4 and t.is_floating_point():
                t = t.contiguous(memory_format=torch.channels_last)
            moved[k] = t
        torch.cuda.synchronize(self.device)  # the pinned host buffers may be freed after this
        return replace(data, **moved)

    def prepare(self, method, teacher=None) -> None:
        """channels_last for the method's modules and the teacher; torch.compile of the student."""
        if self.channels_last:
            method.to(memory_format=torch.channels_last)
            model = getattr(teacher, "model", None)
            if model is not None:
                model.to(memory_format=torch.channels_last)
        if self.compile:
            method.student.compile()  # in place: parameters and state_dict keys unchanged
            log.info("student compiled with torch.compile")

    # -- per step ------------------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backward: scaled by the fp16 GradScaler, else as is."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss: torch.Tensor) -> None:
        self.scaled(loss).backward()

    def reduce_gradients(self, optimizer, weight: float) -> None:
        """DDP: sum over ranks of weight x local gradient (weight = local shard / global batch).
        optim.name=dot: a gradient that no rank has stays None, as in one process (DOT tells which
        of a parameter's task and distillation gradients exist by it); that costs a host sync, so
        the other optimizers get zeros there as before."""
        if not self.dist.active:
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = [g.reshape(-1) * weight for g in grads]
        keep_none = isinstance(optimizer, DOT)
        if keep_none:  # one all-reduce for the gradients and the count of ranks that have each
            flat.append(torch.tensor([float(p.grad is not None) for p in params], dtype=flat[0].dtype,
                                     device=flat[0].device))
        flat = torch.cat(flat)
        self.dist.all_reduce_(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
        if keep_none:
            for p, count in zip(params, flat[offset:].tolist()):
                if count == 0:
                    p.grad = None

    def step(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def scalar(self, v: torch.Tensor):
        """A loss value for the epoch sums: a float on the CPU, a device tensor on a GPU (no sync)."""
        return v.detach().float() if self.device.type == "cuda" else v.item()

    def reduce_sums(self, sums: Dict[str, float]) -> Dict[str, float]:
        """Epoch sums to floats; DDP: summed over ranks (each rank weighted its part)."""
        if not self.dist.active:  # a fused group's sums are vectors (one entry per student)
            return {k: v.tolist() if torch.is_tensor(v) and v.dim() else float(v) for k, v in sums.items()}
        keys = sorted(sums)
        if not keys:
            return {}
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64).to(self.device) for k in keys])
        vec = vec.to(self._collective_device())
        self.dist.all_reduce_(vec)
        return dict(zip(keys, vec.tolist()))

    def _collective_device(self) -> torch.device:
        import torch.distributed as dist

        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    @torch.no_grad()
    def evaluate(self, model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> Dict[str, float]:
        """kdexp.engine.evaluate.evaluate, sharded over ranks with DDP (counts and loss sums all-reduced)."""
        if not self.dist.active:
            return evaluate(model, x, y, batch_size)
        was_training = model.training
        model.eval()
        part = torch.arange(len(x), device=y.device).tensor_split(self.dist.world)[self.dist.rank]
        correct = torch.zeros((), dtype=torch.float64, device=y.device)
        loss = torch.zeros((), dtype=torch.float64, device=y.device)
        for sel, xb in batches_of(x, batch_size, positions=part):  # streamed inputs: read by the loader's workers
            logits = model(xb.to(y.device, non_blocking=True))
            correct += (logits.argmax(-1) == y[sel]).sum()
            loss += F.cross_entropy(logits.float(), y[sel], reduction="sum").double()
        model.train(was_training)
        vec = torch.stack([correct, loss]).to(self._collective_device())
        self.dist.all_reduce_(vec)
        c, s = vec.tolist()
        return {"acc": c / len(x), "loss": s / len(x)}

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


CPU = Accelerator()
