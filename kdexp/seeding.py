"""Seeds per purpose: each random stream (student init, batch order, teacher) gets its own
seed derived from the run seed, so one stream never shifts another."""
import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, stream: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{stream}".encode()).digest()[:8], "little") % (2 ** 63)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
