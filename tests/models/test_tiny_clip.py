"""The tiny CLIP's offline digits pretraining (fedlt/models/tiny_clip.py, pretrained tag ``fedlt-digits``).

The full checkpoint is built once per test session (~30 s on one core) in the session's isolated cache, the one
tests/conftest.py points ``FEDLT_CACHE`` at; every other test reads it from there.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fedlt.data.sources import EmbeddedDigits, read_cache
from fedlt.models import build_model
from fedlt.models import tiny_clip as tc
from fedlt.models.clip import CLIP_MEAN, CLIP_STD, ClipModel, create_open_clip
from fedlt.registry import UnknownNameError

# Measured with the default recipe (seed 0, one CPU thread): zero-shot 0.80 on the 32 px test digits (0.73 on 16 px
# digits upsampled to 32), nearest-class-mean accuracy of the image features 0.76 (random weights: 0.18), mean
# cosine between test images 0.01 (random weights: 0.99). The thresholds leave room for other thread counts / BLAS.
MIN_ZERO_SHOT = 0.65
MIN_NCM = 0.6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> os.PathLike[str]:
    """Builds (or finds) the default checkpoint in the session cache that conftest's FEDLT_CACHE points to."""
    cache = tmp_path_factory.getbasetemp() / "fedlt-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDLT_CACHE", str(cache))  # the digits the build reads land there too
        state = torch.get_rng_state()
        path = tc.digits_checkpoint()
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert path.parent == cache and path.is_file()
    return path


@pytest.fixture(scope="module")
def digits(checkpoint) -> EmbeddedDigits:
    # Same parameters (and cache) as the build's training data; only test_x / test_y are evaluated here.
    return EmbeddedDigits(root=str(checkpoint.parent), image_size=32)


def _features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = (images.to(torch.float32).expand(-1, 3, -1, -1) / 255.0 - mean) / std
    with torch.no_grad():
        return F.normalize(model.encode_image(x), dim=-1)


def test_zero_shot_accuracy_and_informative_features(checkpoint, digits) -> None:
    model = create_open_clip("fedlt-tiny-clip", pretrained=True, tag="fedlt-digits")
    data = digits.load()
    acc = tc.digits_zero_shot_accuracy(model, data.test_x, data.test_y)
    assert acc >= MIN_ZERO_SHOT, acc
    # The image features separate the digits: a nearest-class-mean probe (class means from training images).
    random = tc._new_model(tc.TINY_CLIP, 0)
    ncm = {}
    for name, m in (("trained", model), ("random", random)):
        train_f, test_f = _features(m, data.train_x[::10]), _features(m, data.test_x)
        means = F.normalize(torch.stack([train_f[data.train_y[::10] == c].mean(0) for c in range(10)]), dim=-1)
        ncm[name] = float(((test_f @ means.t()).argmax(1) == data.test_y).float().mean())
        if name == "trained":
            assert float((test_f @ test_f.t()).mean()) < 0.5  # random weights: ~0.99 (nearly collinear)
    assert ncm["trained"] >= MIN_NCM and ncm["trained"] > ncm["random"] + 0.3, ncm


def test_loads_the_cached_weights_without_training(checkpoint, monkeypatch, capsys) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the cached checkpoint must be reused")

    monkeypatch.setattr(tc, "train_digits_clip", fail)
    model = create_open_clip("fedlt-tiny-clip", pretrained=True, tag="fedlt-digits")
    assert "building" not in capsys.readouterr().err
    saved = read_cache(checkpoint)
    state = model.state_dict()
    assert set(saved) <= set(state)
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert not torch.equal(state["visual.proj"], tc._new_model(tc.TINY_CLIP, 0).state_dict()["visual.proj"])


def test_build_model_with_the_digits_tag(checkpoint, digits, monkeypatch) -> None:
    monkeypatch.setattr(tc, "train_digits_clip", lambda *a, **k: pytest.fail("retrained"))
    model = build_model("clip:fedlt-tiny-clip", 10, in_channels=1, image_size=32, pretrained=True,
                        tag="fedlt-digits", dataset="digits", peft="prompt")
    assert isinstance(model, ClipModel)
    data = digits.load()
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = (data.test_x.to(torch.float32) / 255.0 - mean) / std  # 1 channel broadcast to 3
    acc = float((model.zero_shot_logits(x).argmax(1) == data.test_y).float().mean())
    assert acc >= MIN_ZERO_SHOT, acc


def test_unknown_tags() -> None:
    with pytest.raises(UnknownNameError, match="fedlt-digits"):
        create_open_clip("fedlt-tiny-clip", pretrained=True, tag="not-a-tag")
    with pytest.raises(UnknownNameError):  # the digits weights exist only for the tiny configuration
        create_open_clip("ViT-B-16", pretrained=True, tag="fedlt-digits")


def test_cache_key() -> None:
    base = tc.digits_checkpoint_path(root="/c")
    assert base == tc.digits_checkpoint_path(tc.DigitsPretraining(), root="/c")  # stable
    assert base.name.startswith(f"fedlt-tiny-clip-fedlt-digits-s0-v{tc.RECIPE_VERSION}-")
    others = {tc.digits_checkpoint_path(tc.DigitsPretraining(seed=1), root="/c"),
              tc.digits_checkpoint_path(tc.DigitsPretraining(steps=301), root="/c"),
              tc.digits_checkpoint_path(tc.DigitsPretraining(lr=1e-3), root="/c")}
    assert base not in others and len(others) == 3


def _few_steps(seed: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    data = EmbeddedDigits(image_size=32, train_per_class=20, test_per_class=1).load()
    recipe = tc.DigitsPretraining(steps=50, batch_size=32, seed=seed)
    model = tc._new_model(tc.TINY_CLIP, seed)
    losses = tc.train_digits_clip(model, data.train_x, data.train_y, recipe, tc._tokenizer(tc.TINY_CLIP), steps=3)
    return model.state_dict(), losses


def test_training_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, losses_a = _few_steps(0)
    assert torch.equal(torch.get_rng_state(), state)
    b, losses_b = _few_steps(0)
    c, _ = _few_steps(1)
    assert losses_a == losses_b and len(losses_a) == 3
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.proj"], c["visual.proj"])


def test_small_build_is_cached_atomically(tmp_path, capsys) -> None:
    recipe = tc.DigitsPretraining(steps=2, batch_size=16, train_per_class=20)
    path = tc.digits_checkpoint(recipe=recipe, root=tmp_path)
    assert "building the tiny CLIP's digits pretraining" in capsys.readouterr().err
    assert path.parent == tmp_path and [p.name for p in tmp_path.glob("fedlt-tiny-clip-*")] == [path.name]
    assert tc.digits_checkpoint(recipe=recipe, root=tmp_path) == path  # a hit: no second message
    assert capsys.readouterr().err == ""
