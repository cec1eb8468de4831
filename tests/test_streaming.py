"""Streamed data (kdexp.data.stream, dataset.in_memory): the same samples, batches and views as in
memory, read by DataLoader workers; the teacher's logits on disk (kdexp.engine.output_store)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdexp.data import load_dataset
from kdexp.data.augment import Augment
from kdexp.data.stream import LazyInputs, batches_of, rrc_box
from kdexp.errors import ConfigError, DataContentError
from kdexp.train import run
from tests.conftest import sigkill_after_epochs, torchrun_kdexp

FAST = ["epochs=2", "teacher.epochs=3", "progress=false"]


def metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def png_digits(root: Path, per_class: int = 40, val_per_class: int = 10) -> Path:
    """scikit-learn's digits as PNG files in ImageFolder layout: train/<digit>/*.png, val/<digit>/*.png."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for split, lo, hi in (("train", 0, per_class), ("val", per_class, per_class + val_per_class)):
        for c in range(10):
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(np.flatnonzero(d.target == c)[lo:hi]):
                Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), "L").save(folder / f"{j:03d}.png")
    return root


def folder_cfg(path, **kw):
    base = {"name": "imagefolder", "root": str(path), "path": str(path), "classes": None, "val_fraction": 0.2,
            "split_seed": 0, "normalize": True, "download": False, "label_fraction": 1.0, "augment": "none",
            "augment_pad": 4, "augment_views": 0, "val_from_train": None, "in_memory": "auto", "memory_budget_gb": 8.0,
            "workers": 0, "mean": None, "std": None, "augment_scale": [0.08, 1.0], "channels": None,
            "image_size": None, "crop_size": None, "resize": None}
    return OmegaConf.create({**base, **kw})


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    return png_digits(tmp_path_factory.mktemp("pngs"))


# -- the data ------------------------------------------------------------------------------------
def test_streamed_inputs_are_the_in_memory_tensors(digits_folder):
    mem = load_dataset(folder_cfg(digits_folder, in_memory=True))
    lazy = load_dataset(folder_cfg(digits_folder, in_memory=False, workers=2))
    assert isinstance(lazy.x_train, LazyInputs) and isinstance(mem.x_train, torch.Tensor)
    assert lazy.x_train.shape == mem.x_train.shape and lazy.in_shape == mem.in_shape == (1, 8, 8)
    assert torch.equal(lazy.y_train, mem.y_train) and torch.equal(lazy.y_val, mem.y_val)
    idx = torch.tensor([5, 0, 399, 17])
    assert torch.equal(lazy.x_train[idx], mem.x_train[idx])  # normalized with the same statistics (all <= 2048)
    assert torch.equal(lazy.x_train[3:9], mem.x_train[3:9])
    read = torch.cat([xb for _, xb in batches_of(lazy.x_val, 32)])  # by the workers, in order
    assert torch.equal(read, mem.x_val)


def test_auto_streams_above_the_memory_budget(digits_folder):
    assert isinstance(load_dataset(folder_cfg(digits_folder)).x_train, torch.Tensor)
    tiny = load_dataset(folder_cfg(digits_folder, memory_budget_gb=1e-6))  # 500 x 64 floats > 1 KB
    assert isinstance(tiny.x_train, LazyInputs)


def test_a_streamed_crop_flip_draw_is_the_in_memory_view(digits_folder):
    mem = load_dataset(folder_cfg(digits_folder, in_memory=True, augment="crop_flip", augment_pad=2))
    lazy = load_dataset(folder_cfg(digits_folder, in_memory=False, augment="crop_flip", augment_pad=2))
    aug = Augment("crop_flip", 2, 0, seed=7)
    idx = torch.tensor([3, 1, 250])
    for draw in (0, 5):
        assert torch.equal(aug.view(lazy.x_train, draw).index_select(0, idx), aug.view(mem.x_train, draw).index_select(0, idx))


def test_rrc_boxes_are_replayable_and_inside_the_image():
    boxes = [rrc_box(torch.Generator().manual_seed(s), 37, 53) for s in range(200)]
    assert boxes == [rrc_box(torch.Generator().manual_seed(s), 37, 53) for s in range(200)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 37 and 0 <= left and left + w <= 53 and h > 0 and w > 0
    areas = [h * w / (37 * 53) for _, _, h, w in boxes]
    assert min(areas) < 0.3 and max(areas) > 0.7  # the scale range (0.08, 1) is used


def test_rrc_flip_views_depend_on_seed_draw_and_sample_only(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for j, size in enumerate([(40, 30), (25, 50), (33, 33)]):  # images of several sizes
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8), "RGB").save(tmp_path / "train" / c / f"{j}.png")
    cfg = folder_cfg(tmp_path, in_memory=False, augment="rrc_flip", crop_size=16, val_fraction=0.34)
    data = load_dataset(cfg)
    assert data.in_shape == (3, 16, 16)
    aug = Augment("rrc_flip", 0, 0, seed=3)
    a = aug.view(data.x_train, 1)[0:len(data.x_train)]
    assert a.shape == (len(data.x_train), 3, 16, 16)
    assert torch.equal(a, aug.view(data.x_train, 1)[0:len(data.x_train)])  # replayed exactly
    assert not torch.equal(a, aug.view(data.x_train, 2)[0:len(data.x_train)])  # another draw, other views
    with pytest.raises(ConfigError, match="rrc_flip"):
        load_dataset(folder_cfg(tmp_path, in_memory=True, augment="rrc_flip", crop_size=16, val_fraction=0.34))


def test_a_corrupt_image_met_by_a_worker_is_one_line(tmp_path, digits_folder):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(digits_folder, root)
    bad = root / "val" / "3" / "005.png"  # train/ is read for the statistics at load time; val/ first by a worker
    bad.write_bytes(bad.read_bytes()[:60])  # the header reads, the pixels do not
    data = load_dataset(folder_cfg(root, in_memory=False, workers=2))
    with pytest.raises(DataContentError) as e:
        list(batches_of(data.x_val, 64))
    assert "005.png" in str(e.value) and "corrupt" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,words", [
    (["dataset.in_memory=maybe"], "dataset.in_memory='maybe': one of auto, true, false"),
    (["dataset.in_memory=false", "domain=vflip"], "set dataset.in_memory=true"),
    (["dataset.in_memory=true", "dataset.augment=rrc_flip"], "set dataset.in_memory=false"),
    (["teacher.cache_topk=10"], "teacher.cache_topk=10 is out of range: 1..9"),
    (["teacher.cache_topk=3", "teacher.cache_disk=false"], "teacher.cache_disk=false turns off"),
    (["teacher.cache_disk=sometimes"], "teacher.cache_disk='sometimes': one of auto, true, false"),
])
def test_placement_mistakes_fail_in_the_plan(compose_cfg, overrides, words):
    from kdexp.engine.plan import plan

    with pytest.raises(ConfigError) as e:
        plan(compose_cfg(*overrides))
    assert words in str(e.value)


def test_streamed_runs_do_not_fuse(compose_cfg):
    from kdexp.engine.plan import plan

    assert plan(compose_cfg("dataset.in_memory=true")).fuse_reason is None
    assert "dataset.in_memory=false" in plan(compose_cfg("dataset.in_memory=false")).fuse_reason


# -- training --------------------------------------------------------------------------------------
def test_streamed_digits_train_as_in_memory(compose_cfg, tmp_path):
    """The same batches, views and teacher: the streamed run gives the in-memory run's numbers."""
    a = run(compose_cfg(*FAST, "dataset.in_memory=true"), str(tmp_path / "mem"))
    b = run(compose_cfg(*FAST, "dataset.in_memory=false", "dataset.workers=2"), str(tmp_path / "stream"))
    ma, mb = metrics(tmp_path / "mem"), metrics(tmp_path / "stream")
    assert a == b
    for key in ("train/loss", "val/loss"):
        assert ma["final"][key] == pytest.approx(mb["final"][key], rel=1e-6)
    assert mb["teacher_cache"]["disk"]["computed"] == 1  # the streamed run keeps the logits on disk
    assert "disk" not in ma["teacher_cache"]
    assert mb["teacher_cache"]["disk"]["views"]["train"]["served_from"] == "memory"  # within teacher.cache_max_gb
    # a later run opens the store; above the memory budget every batch is gathered from the memory map
    run(compose_cfg(*FAST, "dataset.in_memory=false", "method.temperature=2", "teacher.cache_max_gb=1e-6"),
        str(tmp_path / "again"))
    again = metrics(tmp_path / "again")["teacher_cache"]["disk"]
    assert again["computed"] == 0 and again["opened"] == 1 and again["samples_read"] == 2 * 1437
    assert again["views"]["train"]["served_from"] == "memory map"


@pytest.mark.slow  # three runs of 6 epochs on PNG files
def test_png_digits_train_kd_in_memory_and_streamed_and_reuse_the_disk_cache(compose_cfg, tmp_path, digits_folder):
    args = [*FAST, "dataset=imagefolder", f"dataset.path={digits_folder}", "epochs=6", "teacher.epochs=8"]
    run(compose_cfg(*args, "dataset.in_memory=true"), str(tmp_path / "mem"))
    run(compose_cfg(*args, "dataset.in_memory=false", "dataset.workers=2"), str(tmp_path / "s1"))
    run(compose_cfg(*args, "dataset.in_memory=false", "dataset.workers=2", "method.temperature=2"), str(tmp_path / "s2"))
    mem, s1, s2 = (metrics(tmp_path / n) for n in ("mem", "s1", "s2"))
    assert s1["final"]["val/acc"] > 0.7 and abs(s1["final"]["val/acc"] - mem["final"]["val/acc"]) < 0.05
    d1, d2 = s1["teacher_cache"]["disk"], s2["teacher_cache"]["disk"]
    assert d1["computed"] == 1 and d1["opened"] == 0
    assert d2["computed"] == 0 and d2["opened"] == 1 and d2["samples_read"] == 400  # read whole, once
    assert d1["views"]["train"]["path"] == d2["views"]["train"]["path"]


def test_topk_outputs_on_disk_train(compose_cfg, tmp_path):
    run(compose_cfg("epochs=1", "teacher.epochs=2", "progress=false", "dataset.in_memory=false", "dataset.workers=0",
                    "teacher.cache_topk=3"), str(tmp_path / "k"))
    m = metrics(tmp_path / "k")
    assert m["status"] == "done" and m["teacher_cache"]["disk"]["topk"] == 3
    assert m["final"]["val/acc"] > 0.3


# -- ImageNet ------------------------------------------------------------------------------------
def tiny_imagenet(root: Path, classes=("n01440764", "n01443537"), train=6, val=2) -> Path:
    """A generated ImageFolder in torchvision's ImageNet layout: JPEGs of several sizes per wnid."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for j in range(n):
                h, w = int(rng.integers(60, 120)), int(rng.integers(60, 120))
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(root / split / c / f"{c}_{j}.JPEG")
    return root


@pytest.fixture(scope="module")
def imagenet_files(tmp_path_factory):
    import torchvision

    root = tmp_path_factory.mktemp("imagenet_root")
    tiny_imagenet(root / "imagenet")
    torch.manual_seed(0)
    weights = root / "resnet34.pth"  # a local weights file in torchvision's format (random: no download here)
    torch.save(torchvision.models.resnet34(num_classes=2).state_dict(), weights)
    return root, weights


def imagenet_args(root, weights, crop=None):
    args = ["experiment=imagenet_resnet34_resnet18", f"dataset.root={root}", f"teacher.checkpoint={weights}",
            "epochs=1", "batch_size=4", "eval_batch_size=4", "dataset.workers=2", "progress=false"]
    return args + ([f"dataset.crop_size={crop}", f"dataset.resize={crop + crop // 7}"] if crop else [])


@pytest.mark.slow  # ResNet-34 -> ResNet-18 at 224x224 on the CPU: ~15 s
def test_the_imagenet_preset_runs_its_steps_on_a_generated_folder(compose_cfg, tmp_path, imagenet_files):
    root, weights = imagenet_files
    preset = compose_cfg(*imagenet_args(root, weights))
    assert (preset.hardware.device, preset.hardware.amp, preset.hardware.channels_last) == ("auto", "bf16", True)
    cfg = compose_cfg(*imagenet_args(root, weights), "hardware=cpu")  # replaces the preset's GPU options whole
    assert cfg.optim.lr == 0.1 and cfg.optim.milestones == [30, 60, 90] and cfg.dataset.crop_size == 224
    assert cfg.hardware.amp == "none"
    run(cfg, str(tmp_path / "run"))
    m = metrics(tmp_path / "run")
    assert m["status"] == "done" and len(m["history"]) == 1
    assert m["teacher"]["source"] == "checkpoint" and m["teacher_cache"]["enabled"]
    assert m["augment"]["kind"] == "rrc_flip" and m["teacher_cache"]["online_calls"] == 3  # fresh crops: online
    data = load_dataset(compose_cfg(*imagenet_args(root, weights)).dataset)
    assert isinstance(data.x_train, LazyInputs) and data.in_shape == (3, 224, 224) and data.num_classes == 2


@pytest.mark.slow  # torchrun subprocesses end to end
def test_the_imagenet_preset_under_two_gloo_processes(tmp_path, imagenet_files):
    root, weights = imagenet_files
    torchrun_kdexp(tmp_path, *imagenet_args(root, weights, crop=64), f"paths.cache_dir={tmp_path / 'cache'}",
                   f"hydra.run.dir={tmp_path / 'ddp'}")
    m = metrics(tmp_path / "ddp")
    assert m["status"] == "done" and m["hardware"]["processes"] == 2 and len(m["history"]) == 1


@pytest.mark.slow  # torchrun subprocesses end to end
def test_streamed_ddp_ranks_read_distinct_shards_and_match_one_process(compose_cfg, tmp_path):
    """Each rank reads its half of every global batch: only two distinct halves give one process's numbers."""
    common = ["epochs=2", "teacher.epochs=2", "progress=false", "dataset.in_memory=false",
              f"paths.cache_dir={tmp_path / 'cache'}"]
    single = run(compose_cfg(*common, "hardware=cpu"), str(tmp_path / "one"))
    torchrun_kdexp(tmp_path, *common, f"hydra.run.dir={tmp_path / 'ddp'}")
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "ddp")
    assert b["hardware"]["processes"] == 2 and b["final"]["val/acc"] == pytest.approx(single, abs=1e-9)
    for k, v in a["final"].items():
        assert b["final"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


@pytest.mark.slow  # subprocesses end to end
def test_a_streamed_run_killed_mid_epoch_resumes_to_the_same_metrics(tmp_path, digits_folder):
    import subprocess
    import sys

    train = [sys.executable, "-m", "kdexp.train"]
    args = ["dataset=imagefolder", f"dataset.path={digits_folder}", "dataset.in_memory=false", "dataset.workers=2",
            "dataset.augment=crop_flip", "dataset.augment_pad=1", "dataset.augment_views=2", "epochs=12",
            "teacher.epochs=3", "batch_size=8", "progress=false", f"paths.cache_dir={tmp_path / 'cache'}"]
    full = subprocess.run([*train, *args, f"hydra.run.dir={tmp_path / 'full'}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path / "killed"
    # killed 0.15 s into the 4th epoch: its 50 steps of 8 streamed samples take longer than that
    interrupted = sigkill_after_epochs([*train, *args, f"hydra.run.dir={killed}"], tmp_path, killed, 3, after=0.15)
    assert interrupted["status"] == "running" and 3 <= len(interrupted["history"]) < 12, "not killed mid-training"
    resumed = subprocess.run([*train, *args, f"hydra.run.dir={killed}"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = metrics(tmp_path / "full"), metrics(killed)
    assert b["status"] == "done" and len(b["history"]) == 12
    assert [h["val/loss"] for h in a["history"]] == [h["val/loss"] for h in b["history"]]
    assert a["final"] == b["final"]
    assert b["teacher_cache"]["disk"]["opened"] == 2  # both draws' outputs came from the first run's store


@pytest.mark.slow  # a sweep of 4 processes
def test_a_sweep_of_four_streamed_runs_computes_the_teacher_outputs_once(tmp_path, digits_folder):
    import subprocess
    import sys

    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "-m", "kdexp.train", "-m", "method.temperature=1,2,4,8", "dataset=imagefolder",
                          f"dataset.path={digits_folder}", "dataset.in_memory=false", "epochs=2", "teacher.epochs=3",
                          "progress=false", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    runs = [json.loads(p.read_text()) for p in sweep.rglob("metrics.json")]
    assert len(runs) == 4 and all(r["status"] == "done" for r in runs)
    disks = [r["teacher_cache"]["disk"] for r in runs]
    assert sum(d["computed"] for d in disks) == 1 and sum(d["opened"] for d in disks) == 3
    assert len({d["views"]["train"]["path"] for d in disks}) == 1
    assert sum(r["teacher"]["source"] == "trained" for r in runs) == 1
