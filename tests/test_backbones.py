"""Tests for common.backbones: name grammar, the tiny open_clip config, local checkpoints and the offline default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.backbones import Backbone, BackboneError, build_backbone, load_rgb
from common.backbones import effnet_minilm
from common.backbones import openclip as oc_backbone

TINY = "openclip:fedxmr-tiny"
CAPTIONS = ["A dog runs on the grass.", "A puppy running across a lawn."]
UNRELATED = "A man rides a bicycle in the city."


def _fresh_build(name: str) -> Backbone:
    """Build with an empty open_clip model cache so that weights are really re-created/re-loaded."""
    oc_backbone._load.cache_clear()
    return build_backbone(name, device="cpu")


@pytest.fixture(scope="module")
def tiny_feats(flickr8k_images: list[Path]) -> tuple[np.ndarray, np.ndarray, torch.nn.Module]:
    """Image and caption features of the randomly initialised tiny model, plus the model itself."""
    bb = _fresh_build(TINY)
    img_enc = bb.image_encoder()
    return img_enc.encode(flickr8k_images), bb.text_encoder().encode(CAPTIONS), img_enc.net


# ------------------------------------------------------------------------------------------ open_clip
def test_tiny_dims_from_config_without_loading() -> None:
    """Guards that dims and cache keys come from the JSON config alone (no model is built)."""
    cfg = json.loads((Path(oc_backbone.__file__).parent / "configs" / "fedxmr-tiny.json").read_text())
    bb = _fresh_build(TINY)
    assert bb.img_dim == bb.txt_dim == cfg["embed_dim"] == 64
    assert oc_backbone._load.cache_info().currsize == 0, "building the backbone must not load weights"
    assert "random-seed0" in bb.img_key and "random-seed0" in bb.txt_key and bb.img_key != bb.txt_key


def test_tiny_encoders_normalised(tiny_feats: tuple[np.ndarray, np.ndarray, torch.nn.Module]) -> None:
    """Guards (n, 64) finite, L2-normalised, input-dependent features for real images and captions."""
    img, txt, _ = tiny_feats
    for feats in (img, txt):
        assert feats.shape == (2, 64) and feats.dtype == np.float32 and np.all(np.isfinite(feats))
        np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
        assert not np.allclose(feats[0], feats[1]), "different inputs must give different features"


def test_tiny_random_init_is_reproducible(flickr8k_images: list[Path],
                                          tiny_feats: tuple[np.ndarray, np.ndarray, torch.nn.Module]) -> None:
    """Guards the seeded random init (every node gets the same frozen features) and an untouched global RNG."""
    img, txt, net = tiny_feats
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    bb = _fresh_build(TINY)
    enc = bb.image_encoder()
    assert torch.equal(torch.rand(3), expected_draw), "building must not consume the caller's torch RNG"
    assert enc.net is not net, "cache_clear should force a real rebuild"
    np.testing.assert_array_equal(enc.encode(flickr8k_images), img)
    np.testing.assert_array_equal(bb.text_encoder().encode(CAPTIONS), txt)


@pytest.mark.parametrize("name", ["foo", "openclip:", "openclip:no-such-model", "effnet-lite0"])
def test_unknown_backbone_names(name: str) -> None:
    """Guards that a bad backbone name fails at build time with the name in the message."""
    with pytest.raises(BackboneError) as err:
        build_backbone(name)
    assert repr(name) in str(err.value) or repr(name.split(":", 1)[-1]) in str(err.value)


@pytest.mark.timeout(120)
def test_unavailable_pretrained_tag_is_offline_error() -> None:
    """Guards the offline policy: a pretrained tag that is not on disk fails fast, suggesting a local checkpoint."""
    bb = _fresh_build("openclip:fedxmr-tiny:laion2b_s34b_b79k")
    assert bb.img_dim == 64
    with pytest.raises(BackboneError) as err:
        bb.image_encoder()
    msg = str(err.value)
    assert "Nothing is downloaded" in msg and "local checkpoint" in msg and "fedxmr-tiny" in msg


def test_local_checkpoint(tmp_path: Path, flickr8k_images: list[Path],
                          tiny_feats: tuple[np.ndarray, np.ndarray, torch.nn.Module]) -> None:
    """Guards loading weights from a local file: content-hashed key, and the saved weights are the ones used."""
    img, txt, net = tiny_feats
    ckpt = tmp_path / "tiny.pt"
    torch.save(net.state_dict(), ckpt)
    bb = _fresh_build(f"{TINY}:{ckpt}")
    assert "ckpt-" in bb.img_key and "ckpt-" in bb.txt_key and "random-seed0" not in bb.img_key
    np.testing.assert_allclose(bb.image_encoder().encode(flickr8k_images), img, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bb.text_encoder().encode(CAPTIONS), txt, rtol=1e-5, atol=1e-6)


def test_checkpoint_key_tracks_content(tmp_path: Path,
                                       tiny_feats: tuple[np.ndarray, np.ndarray, torch.nn.Module]) -> None:
    """Guards the cache key: different checkpoint bytes give different keys, equal bytes the same key."""
    state = tiny_feats[2].state_dict()
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    torch.save(state, a)
    b.write_bytes(a.read_bytes())
    torch.save({k: v + 1 for k, v in state.items()}, c)
    key = {p: build_backbone(f"{TINY}:{p}").img_key for p in (a, b, c)}
    assert key[a] == key[b] and key[a] != key[c]


def test_overwritten_checkpoint_is_reloaded(tmp_path: Path, flickr8k_images: list[Path],
                                            tiny_feats: tuple[np.ndarray, np.ndarray, torch.nn.Module]) -> None:
    """Guards feature-cache integrity: a key naming new checkpoint bytes must come with features of those bytes."""
    img, _, net = tiny_feats
    ckpt = tmp_path / "tiny.pt"
    torch.save(net.state_dict(), ckpt)
    first = build_backbone(f"{TINY}:{ckpt}")
    np.testing.assert_allclose(first.image_encoder().encode(flickr8k_images), img, rtol=1e-5, atol=1e-6)
    torch.save({k: v + 0.05 if v.is_floating_point() else v for k, v in net.state_dict().items()}, ckpt)
    second = build_backbone(f"{TINY}:{ckpt}")
    assert second.img_key != first.img_key
    assert not np.allclose(second.image_encoder().encode(flickr8k_images), img, atol=1e-3)


def test_openclip_image_encoder_bad_file(tmp_path: Path,
                                         tiny_feats: tuple[np.ndarray, np.ndarray, torch.nn.Module]) -> None:
    """Guards that an unreadable image in the open_clip path is a BackboneError naming the file."""
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a jpeg")
    oc_backbone._load.cache_clear()
    with pytest.raises(BackboneError, match="broken.jpg"):
        build_backbone(TINY).image_encoder().encode([bad])


# ------------------------------------------------------------------------------------------ default backbone
def test_default_dims_and_keys_without_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards that the default backbone exposes dims/keys without loading, and loads each modality lazily."""

    def boom(device: str) -> None:
        raise RuntimeError(f"loaded on {device}")

    monkeypatch.setattr(effnet_minilm, "_image", boom)
    monkeypatch.setattr(effnet_minilm, "_text", boom)
    bb = build_backbone("effnet-lite0+minilm")
    assert (bb.img_dim, bb.txt_dim) == (1280, 384)
    assert bb.img_key == effnet_minilm.IMAGE_KEY and bb.txt_key == effnet_minilm.TEXT_KEY
    assert bb.img_key != bb.txt_key
    with pytest.raises(RuntimeError, match="loaded on cpu"):
        bb.image_encoder()


@pytest.fixture(scope="module")
def default_backbone() -> Backbone:
    return build_backbone("effnet-lite0+minilm", device="cpu")


def test_effnet_image_features(default_backbone: Backbone, flickr8k_images: list[Path]) -> None:
    """Guards the real EfficientNet-Lite0 features: (n, 1280), finite, non-negative mean, batch-invariant."""
    enc = default_backbone.image_encoder()
    feats = enc.encode(flickr8k_images)
    assert feats.shape == (2, 1280) and feats.dtype == np.float32 and np.all(np.isfinite(feats))
    assert np.all(feats.mean(axis=1) > 0) and feats.min() >= 0
    assert not np.allclose(feats[0], feats[1])
    np.testing.assert_allclose(enc.encode(flickr8k_images[:1])[0], feats[0], rtol=1e-4, atol=1e-5)


def test_mid_level_image_features_are_the_nets_own_stage5_output(default_backbone: Backbone,
                                                                 flickr8k_images: list[Path]) -> None:
    """`effnet-lite0-mid+minilm`: the image features are the full net's block-10 output (read with a hook while it
    runs to the end) averaged on a 2x2 grid, 448-d with their own cache key; the text side is the default's."""
    mid = build_backbone("effnet-lite0-mid+minilm", device="cpu")
    assert (mid.img_dim, mid.txt_dim) == (448, 384)
    assert mid.img_key == effnet_minilm.MID_IMAGE_KEY != default_backbone.img_key
    assert mid.txt_key == default_backbone.txt_key
    enc = mid.image_encoder()
    feats = enc.encode(flickr8k_images)
    assert feats.shape == (2, 448) and feats.dtype == np.float32 and enc.key == mid.img_key
    assert not np.allclose(feats[0], feats[1])
    np.testing.assert_allclose(enc.encode(flickr8k_images[:1])[0], feats[0], rtol=1e-4, atol=1e-5)

    net = default_backbone.image_encoder().net
    seen: list[torch.Tensor] = []
    hook = net._blocks[effnet_minilm.MID_BLOCKS - 1].register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        default_backbone.image_encoder().encode(flickr8k_images)
    finally:
        hook.remove()
    (stage5,) = seen
    assert stage5.shape[1:] == (112, 14, 14)
    expected = torch.nn.functional.adaptive_avg_pool2d(stage5, 2).flatten(1).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-4)


def test_minilm_text_features(default_backbone: Backbone) -> None:
    """Guards MiniLM: (n, 384) unit-norm, padding-invariant pooling, and semantic similarity ordering."""
    enc = default_backbone.text_encoder()
    pair = enc.encode(CAPTIONS)
    assert pair.shape == (2, 384) and pair.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(pair, axis=1), 1.0, rtol=1e-5)
    other = enc.encode([UNRELATED])[0]
    np.testing.assert_allclose(np.linalg.norm(other), 1.0, rtol=1e-5)
    close, far = float(pair[0] @ pair[1]), float(pair[0] @ other)
    assert close > far + 0.3, (close, far)
    alone = enc.encode(CAPTIONS[:1])[0]  # no padding: must match the padded batch row
    np.testing.assert_allclose(alone, pair[0], atol=1e-5)


def test_load_rgb(tmp_path: Path, flickr8k_images: list[Path]) -> None:
    """Guards load_rgb: HWC float32 in [0, 1] at the requested size, and a BackboneError naming a bad file."""
    rgb = load_rgb(flickr8k_images[0], 64)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.float32
    assert 0.0 <= rgb.min() and rgb.max() <= 1.0 and rgb.std() > 0
    bad = tmp_path / "notes.txt"
    bad.write_text("hello, I am not an image")
    with pytest.raises(BackboneError, match="notes.txt"):
        load_rgb(bad, 224)
    with pytest.raises(BackboneError, match="missing.jpg"):
        load_rgb(tmp_path / "missing.jpg", 224)


def test_open_clip_imports_in_a_fresh_process() -> None:
    """ClientApp subprocesses and Ray workers are fresh interpreters: importing the app package must be enough."""
    import subprocess
    import sys

    code = "import fedxmr_client, open_clip; print(len(open_clip.list_models()) > 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


def test_bf16_encoding_agrees_with_fp32_and_keeps_its_own_cache_keys(default_backbone: Backbone,
                                                                     flickr8k_images: list[Path]) -> None:
    """`<name>@bf16`: the same encoders under autocast (here CPU's bf16); float32 out, features close to fp32, and
    cache keys of their own so the two precisions never mix in a feature cache."""
    mixed = build_backbone("effnet-lite0+minilm@bf16", device="cpu")
    assert (mixed.img_dim, mixed.txt_dim) == (default_backbone.img_dim, default_backbone.txt_dim)
    assert mixed.img_key == default_backbone.img_key + "@bf16" != default_backbone.img_key
    assert mixed.image_encoder().key == mixed.img_key and mixed.text_encoder().key == mixed.txt_key
    for full, half in ((default_backbone.image_encoder().encode(flickr8k_images),
                        mixed.image_encoder().encode(flickr8k_images)),
                       (default_backbone.text_encoder().encode(CAPTIONS), mixed.text_encoder().encode(CAPTIONS))):
        assert half.dtype == np.float32 and not np.array_equal(half, full)  # autocast really changed the arithmetic
        cos = (half * full).sum(1) / (np.linalg.norm(half, axis=1) * np.linalg.norm(full, axis=1))
        assert cos.min() > 0.99, cos
    with pytest.raises(BackboneError):
        build_backbone("identity@bf16")
