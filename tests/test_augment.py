"""Random augmentation (dataset.augment): replayable draws, and a teacher-output cache that serves
each draw's own outputs (augment_views=K) or runs the teacher online (fresh draws), never the
outputs of another view."""
import json

import pytest
import torch
import torch.nn.functional as F

from kdexp.data.augment import Augment, augment_batch
from kdexp.errors import ConfigError
from kdexp.train import run
from tests.conftest import FAST


def reference(x, params, pad):
    """Per sample, the textbook way: pad, slice the crop, flip it."""
    out = []
    for img, (dy, dx, flip) in zip(x, params.tolist()):
        crop = F.pad(img, (pad,) * 4)[:, dy:dy + img.shape[1], dx:dx + img.shape[2]]
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)


def test_batched_crop_and_flip_match_the_per_sample_reference():
    x = torch.randn(16, 3, 7, 5)
    aug = Augment("crop_flip", pad=2, views=0, seed=3)
    params = aug.params(0, len(x), (7, 5))
    assert params[:, :2].min() >= 0 and params[:, :2].max() <= 4 and set(params[:, 2].tolist()) == {0, 1}
    assert torch.equal(augment_batch(x, params, 2), reference(x, params, 2))
    view = aug.view(x, 0)
    idx = torch.tensor([5, 0, 9])
    assert torch.equal(view.index_select(0, idx), reference(x[idx], params[idx], 2))
    assert torch.equal(view[2:6], reference(x[2:6], params[2:6], 2))


def test_draws_are_fixed_by_seed_and_number():
    aug = Augment("crop_flip", pad=4, views=0, seed=0)
    assert torch.equal(aug.params(1, 100, (8, 8)), aug.params(1, 100, (8, 8)))  # replayable (resume, cache)
    assert not torch.equal(aug.params(1, 100, (8, 8)), aug.params(2, 100, (8, 8)))
    other_seed = Augment("crop_flip", pad=4, views=0, seed=1)
    assert not torch.equal(aug.params(1, 100, (8, 8)), other_seed.params(1, 100, (8, 8)))
    flip_only = Augment("flip", pad=0, views=0).params(0, 50, (8, 8))
    assert flip_only[:, :2].eq(0).all() and flip_only[:, 2].sum() > 0  # no crop: offsets 0 with pad 0
    assert [Augment("crop", 4, 3).draw_of_epoch(e) for e in range(5)] == [0, 1, 2, 0, 1]
    assert [Augment("crop", 4, 0).draw_of_epoch(e) for e in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("override, key", [("dataset.augment=cutmix", "dataset.augment='cutmix' is not one of"),
                                           ("dataset.augment_pad=-1", "dataset.augment_pad=-1"),
                                           ("dataset.augment_views=-2", "dataset.augment_views=-2")])
def test_bad_augment_settings_name_the_key(compose_cfg, tmp_path, override, key):
    cfg = compose_cfg(*FAST, "dataset.augment=crop", override)
    with pytest.raises(ConfigError, match=key):
        run(cfg, str(tmp_path / "run"))


def test_vector_inputs_cannot_be_augmented(compose_cfg, tmp_path):
    cfg = compose_cfg(*FAST, "dataset=fake", "dataset.shape=[20]", "dataset.num_classes=3", "teacher=mlp",
                      "dataset.augment=flip")
    with pytest.raises(ConfigError, match="needs image inputs"):
        run(cfg, str(tmp_path / "run"))


def read(path):
    with open(path) as f:
        return json.load(f)


def test_fixed_draws_are_cached_per_draw_and_match_online(compose_cfg, tmp_path):
    common = ["epochs=3", "teacher.epochs=2", "progress=false", "dataset.augment=crop_flip", "dataset.augment_pad=1",
              "dataset.augment_views=2"]
    cached = run(compose_cfg(*common), str(tmp_path / "cached"))
    online = run(compose_cfg(*common, "teacher.cache=false"), str(tmp_path / "online"))
    a, b = read(tmp_path / "cached" / "metrics.json"), read(tmp_path / "online" / "metrics.json")
    cache = a["teacher_cache"]
    assert cache["views"] == ["train", "train@aug0", "train@aug1"] and cache["online_calls"] == 0
    assert a["augment"] == {"kind": "crop_flip", "pad": 1, "views": 2, "seed": a["augment"]["seed"]}
    assert cached == online
    for k, v in a["final"].items():
        assert v == pytest.approx(b["final"][k], rel=1e-5, abs=1e-5), k
    plain = run(compose_cfg("epochs=3", "teacher.epochs=2", "progress=false"), str(tmp_path / "plain"))
    c = read(tmp_path / "plain" / "metrics.json")
    assert c["teacher"]["key"] != a["teacher"]["key"]  # the teacher trains on augmented images too
    assert c["final"]["train/loss"] != a["final"]["train/loss"]
    assert plain > 0.5


def test_fresh_draws_run_the_teacher_online(compose_cfg, tmp_path):
    cfg = compose_cfg("epochs=2", "teacher.epochs=2", "progress=false", "dataset.augment=crop", "dataset.augment_pad=1",
                      "batch_size=256")
    run(cfg, str(tmp_path / "run"))
    m = read(tmp_path / "run" / "metrics.json")
    steps = -(-1437 // 256)  # digits: 1,437 training samples
    assert m["teacher_cache"]["views"] == ["train"]  # no draw registered: nothing cached for them
    assert m["teacher_cache"]["online_calls"] == 2 * steps and m["teacher_cache"]["hits"] == 0
    # the teacher's key does not depend on the student's augment_views
    cfg2 = compose_cfg("epochs=1", "teacher.epochs=2", "progress=false", "dataset.augment=crop",
                       "dataset.augment_pad=1", "dataset.augment_views=3")
    run(cfg2, str(tmp_path / "run2"))
    m2 = read(tmp_path / "run2" / "metrics.json")
    assert m2["teacher"]["key"] == m["teacher"]["key"] and m2["teacher"]["source"] == "cache"


def test_an_augmented_run_resumes_with_the_same_draws(compose_cfg, tmp_path):
    aug = ["teacher.epochs=2", "progress=false", "dataset.augment=crop_flip", "dataset.augment_pad=1"]
    full = run(compose_cfg("epochs=3", *aug), str(tmp_path / "full"))
    run(compose_cfg("epochs=2", *aug), str(tmp_path / "part"))
    resumed = run(compose_cfg("epochs=3", *aug), str(tmp_path / "part"))  # epoch 3 draws as in the full run
    assert resumed == full
    a, b = read(tmp_path / "full" / "metrics.json"), read(tmp_path / "part" / "metrics.json")
    assert a["final"]["train/loss"] == b["final"]["train/loss"]
    assert a["hparams"]["dataset.augment"] == "crop_flip"
