"""Teacher-output store (kdexp.engine.output_store): what is read back is what was written (top-k:
the FKD reconstruction, checked against an independent formula), a key is computed once, also by
concurrent processes, and a failed or mismatched store is never served."""
import multiprocessing as mp
import os
import time

import numpy as np
import pytest
import torch

from kdexp.engine.output_store import OutputStore, expand_topk, topk_logits
from kdexp.errors import ConfigError


def chunked(logits, size=8, calls=None):
    """A compute() that yields `logits` in chunks of `size` (and counts its calls in `calls`)."""
    def compute():
        if calls is not None:
            calls.append(1)
        for start in range(0, len(logits), size):
            yield start, logits[start:start + size]
    return compute


def never():
    raise AssertionError("compute was called for a complete store")


def leftovers(root):
    return sorted(os.listdir(root))


def test_round_trip_without_topk_is_exact_and_float32(tmp_path):
    torch.manual_seed(0)
    z = torch.randn(37, 5, dtype=torch.float64) * 3
    store = OutputStore.provide(str(tmp_path), "train", 37, 5, chunked(z), describe={"view": "train"})
    assert store.computed and len(store) == 37 and store.topk is None and store.path == str(tmp_path / "train")
    idx = torch.tensor([36, 0, 5, 5, 17, 0, 36, 9, 8, 7])  # unsorted, with repeats, across chunk borders
    got = store.logits(idx)
    assert got.dtype == torch.float32 and got.shape == (10, 5) and got.device == idx.device
    assert torch.equal(got, z.float()[idx])
    assert torch.equal(store.logits(torch.randperm(37)[:0]), torch.empty(0, 5))
    assert np.load(tmp_path / "train" / "logits.npy").dtype == np.float32
    assert store.nbytes() >= 37 * 5 * 4
    with pytest.raises(IndexError):
        store.logits(torch.tensor([37]))
    with pytest.raises(IndexError):
        store.logits(torch.tensor([-1]))  # numpy would wrap it around to the last sample


def reference_topk(z: np.ndarray, k: int):
    """Per sample, in float64, written apart from the module: the top-k classes by sorting, their
    probabilities under the FULL softmax, and the rest of the mass divided evenly."""
    tops, p_tops, p_rests = [], [], []
    for row in z.astype(np.float64):
        top = np.argsort(row)[::-1][:k]
        p = np.exp(row - row.max())
        p /= p.sum()
        tops.append(top)
        p_tops.append(p[top])
        p_rests.append((1.0 - p[top].sum()) / (len(row) - k))
    return np.array(tops), np.array(p_tops), np.array(p_rests)


@pytest.mark.parametrize("k", [1, 3, 9])
def test_topk_reconstruction_matches_an_independent_formula(tmp_path, k):
    torch.manual_seed(k)
    n, c = 29, 10
    z = torch.randn(n, c) * 4 + 50  # a large offset: the fill must not overflow exp
    store = OutputStore.provide(str(tmp_path), "train", n, c, chunked(z, size=8), topk=k)
    assert sorted(os.listdir(store.path)) == ["fill.npy", "indices.npy", "meta.json", "values.npy"]
    assert np.load(os.path.join(store.path, "indices.npy")).dtype == np.int32
    idx = torch.randperm(n)
    hat = store.logits(idx).double().numpy()
    top, p_top, p_rest = reference_topk(z[idx].numpy(), k)
    q = np.exp(hat - hat.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    rows = np.arange(n)[:, None]
    rest = np.ones_like(q, dtype=bool)
    rest[rows, top] = False
    np.testing.assert_allclose(q[rows, top], p_top, rtol=0, atol=1e-6)
    np.testing.assert_allclose(q[rest].reshape(n, c - k), np.repeat(p_rest[:, None], c - k, 1), rtol=0, atol=1e-6)
    assert np.array_equal(hat[rows, top], z[idx].double().numpy()[rows, top])  # the top-k raw logits exactly
    # the pure functions give the same reconstruction
    values, indices, fill = topk_logits(z[idx], k)
    assert torch.equal(expand_topk(values, indices, fill, c), store.logits(idx))


def test_a_complete_store_is_opened_without_computing(tmp_path):
    z = torch.randn(20, 4)
    calls = []
    OutputStore.provide(str(tmp_path), "k", 20, 4, chunked(z, calls=calls), topk=2)
    again = OutputStore.provide(str(tmp_path), "k", 20, 4, never, topk=2)
    assert calls == [1] and not again.computed and again.topk == 2 and len(again) == 20
    assert torch.equal(again.logits(torch.arange(20)), expand_topk(*topk_logits(z, 2), 4))


@pytest.mark.parametrize("other, named", [(dict(n=21), ("n=20", "21")), (dict(topk=3), ("topk=2", "3")),
                                          (dict(topk=None), ("topk=2", "None")),
                                          (dict(num_classes=5), ("num_classes=4", "5"))])
def test_a_store_that_does_not_match_the_request_is_an_error(tmp_path, other, named):
    OutputStore.provide(str(tmp_path), "k", 20, 4, chunked(torch.randn(20, 4)), topk=2)
    request = {**dict(n=20, num_classes=4, topk=2), **other}
    with pytest.raises(ConfigError) as e:
        OutputStore.provide(str(tmp_path), "k", request["n"], request["num_classes"], never, topk=request["topk"])
    assert all(s in str(e.value) for s in named) and "\n" not in str(e.value)


@pytest.mark.parametrize("error", [RuntimeError("teacher failed"), KeyboardInterrupt()])
def test_a_failed_compute_leaves_nothing_and_the_next_call_computes(tmp_path, error):
    z = torch.randn(20, 4)
    os.makedirs(tmp_path / ".tmp-k-crashed")  # a writer that was killed: must not block anyone
    before = leftovers(tmp_path)

    def failing():
        yield 0, z[:8]
        raise error
    with pytest.raises(type(error)):
        OutputStore.provide(str(tmp_path), "k", 20, 4, failing)
    assert [f for f in leftovers(tmp_path) if f not in before and f != "k.lock"] == []
    store = OutputStore.provide(str(tmp_path), "k", 20, 4, chunked(z))
    assert store.computed and torch.equal(store.logits(torch.arange(20)), z)


@pytest.mark.parametrize("chunks", [lambda z: [(0, z[:8])],  # stops short
                                    lambda z: [(0, z[:8]), (9, z[9:])],  # a gap
                                    lambda z: [(0, z[:, :3])]])  # too few classes
def test_chunks_that_do_not_cover_the_view_are_an_error(tmp_path, chunks):
    z = torch.randn(20, 4)
    with pytest.raises(ValueError):
        OutputStore.provide(str(tmp_path), "k", 20, 4, lambda: iter(chunks(z)))
    assert [f for f in leftovers(tmp_path) if f != "k.lock"] == []


@pytest.mark.parametrize("k", [0, -1, 4, 5])
def test_topk_out_of_range_is_a_config_error(tmp_path, k):
    with pytest.raises(ConfigError, match=rf"teacher\.cache_topk={k} is out of range: 1\.\.3"):
        OutputStore.provide(str(tmp_path), "k", 20, 4, never, topk=k)


def slow_view():
    torch.manual_seed(0)
    return torch.randn(24, 6)


def provide_in_a_process(root, counter, out, barrier):
    """One sweep job: waits for the other, then provides the store; its compute counts its calls."""
    def compute():
        with open(counter, "a") as f:
            f.write("called\n")
        z = slow_view()
        for start in range(0, len(z), 8):
            time.sleep(0.1)
            yield start, z[start:start + 8]
    barrier.wait()
    store = OutputStore.provide(root, "shared", 24, 6, compute)
    np.save(out, store.logits(torch.arange(24)).numpy())


def test_concurrent_processes_compute_a_key_once(tmp_path):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(2)
    counter = str(tmp_path / "calls.txt")
    outs = [str(tmp_path / f"out{i}.npy") for i in range(2)]
    procs = [ctx.Process(target=provide_in_a_process, args=(str(tmp_path / "store"), counter, out, barrier))
             for out in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    with open(counter) as f:
        assert f.read().splitlines() == ["called"]
    assert np.array_equal(np.load(outs[0]), slow_view().numpy()) and np.array_equal(np.load(outs[1]), np.load(outs[0]))
