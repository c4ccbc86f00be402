"""The one model loader: offline ImageNet weights that classify a real cat photo, timm
weights from the local caches or a named file, random init only by name (timm-random:),
a fast clear failure when weights are absent, hf-hub from a local cache the test writes,
reid-ray checkpoints (local and S3) with their held-out calibration images, preprocessing
without centre crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_ray.errors import ModelError
from reid_ray.models import (
    CALIBRATION_FILE,
    NetConfig,
    Preprocess,
    ReidNet,
    build_backbone,
    load,
    parse_ref,
    reid_net,
    save_checkpoint,
    write_heldout_ids,
)
from reid_ray.models.loader import timm_preprocess

# ImageNet-1k classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat
DOMESTIC_CATS = {281, 282, 283, 284, 285}
TABBY = 281


def _batch(n=2, size=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def test_efficientnet_lite0_offline_weights_recognise_a_tabby_cat():
    """The weights package mapped onto timm's efficientnet_lite0 is a working ImageNet
    classifier: skimage's 'chelsea' (a tabby cat) comes out as a domestic cat."""
    from skimage.data import chelsea

    model, description = build_backbone(parse_ref("timm:efficientnet_lite0"))
    assert "ImageNet" in description
    preprocess = timm_preprocess(model)
    assert preprocess.resize_mode == "resize"  # the whole photo, no centre crop
    x = preprocess.normalize(preprocess.prepare(chelsea())[None])
    with torch.inference_mode():
        probs = model.eval()(x).softmax(dim=-1)[0]
    top3 = probs.topk(3).indices.tolist()
    assert top3[0] in DOMESTIC_CATS, top3
    assert set(top3) <= DOMESTIC_CATS and TABBY in top3, top3
    assert float(probs[sorted(DOMESTIC_CATS)].sum()) > 0.8


def test_timm_ref_with_offline_weights_embeds_with_them():
    loaded = load("timm:efficientnet_lite0", image_size=96)
    assert "ImageNet" in loaded.description and loaded.embedding_dim == 1280
    assert loaded.preprocess.input_size == (96, 96)
    classifier, _ = build_backbone(parse_ref("timm:efficientnet_lite0"))
    x = _batch(size=96)
    with torch.inference_mode():
        want = classifier.eval().forward_head(classifier.forward_features(x), pre_logits=True)
        got = loaded.model(x)
    torch.testing.assert_close(got, want)


def test_timm_random_init_is_deterministic():
    a, b = load("timm-random:resnet18"), load("timm-random:resnet18")
    assert a.fingerprint == b.fingerprint and "random init" in a.description
    assert a.embedding_dim == 512 and a.preprocess.input_size == (224, 224)
    x = _batch()
    with torch.inference_mode():
        torch.testing.assert_close(a.model(x), b.model(x))
    # a different input size is a different embedding: a different fingerprint
    assert load("timm-random:resnet18", image_size=64).fingerprint != a.fingerprint


@pytest.fixture()
def empty_caches(tmp_path, monkeypatch):
    """No timm weights anywhere: an empty Hugging Face cache and torch hub dir."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "empty-hf"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch-hub"))
    return cache


def test_timm_without_local_weights_fails_fast_and_never_goes_random(empty_caches):
    """timm:NAME never silently starts from random weights: it says how to get them."""
    with pytest.raises(ModelError, match="no pretrained weights on this machine") as info:
        load("timm:resnet18")
    message = str(info.value)
    assert "huggingface-cli download timm/resnet18" in message
    assert "timm-random:resnet18" in message and "timm:resnet18@" in message
    loaded = load("timm-random:resnet18")  # random init: only when asked for by name
    assert "random init" in loaded.description and loaded.heldout_ids is None


def _seeded_resnet(seed=7, num_classes=1000):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_ref_names_a_weights_file(suffix, tmp_path):
    source = _seeded_resnet()  # with its classifier: dropped for the embedding model
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    loaded = load(f"timm:resnet18@{path}")
    assert str(path) in loaded.description and loaded.embedding_dim == 512
    x = _batch()
    with torch.inference_mode():
        want = source.forward_head(source.forward_features(x), pre_logits=True)
        torch.testing.assert_close(loaded.model(x), want)
    assert loaded.fingerprint != load("timm-random:resnet18").fingerprint


def test_weights_file_errors_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="weights file not found"):
        load(f"timm:resnet18@{tmp_path / 'absent.pth'}")
    with pytest.raises(ModelError, match="ends with one of"):
        load(f"timm:resnet18@{tmp_path / 'weights.txt'}")
    wrong = tmp_path / "efficientnet.pth"
    import timm

    torch.save(timm.create_model("efficientnet_lite0", pretrained=False).state_dict(), wrong)
    with pytest.raises(ModelError, match="does not fit timm resnet18"):
        load(f"timm:resnet18@{wrong}")


def test_timm_ref_uses_weights_in_the_hugging_face_cache(hub_cache):
    """timm's own weights repo (timm/resnet18.a1_in1k) found in the local cache is used."""
    source = _seeded_resnet(seed=11)
    _write_hub_cache(hub_cache, "timm/resnet18.a1_in1k", source)
    loaded = load("timm:resnet18")
    assert "pretrained weights" in loaded.description
    x = _batch()
    with torch.inference_mode():
        want = source.forward_head(source.forward_features(x), pre_logits=True)
        torch.testing.assert_close(loaded.model(x), want)


def test_reid_net_keeps_the_loaded_backbone_weights():
    loaded = load("timm:efficientnet_lite0")
    net = reid_net(loaded, embedding_dim=32).eval()
    x = _batch()
    with torch.inference_mode():
        torch.testing.assert_close(
            net.backbone.forward_features(x), loaded.model.model.forward_features(x)
        )
    assert net.embedding_dim == 32 and net.cfg.backbone == "efficientnet_lite0"


def test_checkpoint_exposes_its_heldout_calibration_images(tmp_path):
    net = ReidNet(NetConfig(backbone="resnet18", embedding_dim=16))
    folder = tmp_path / "run"
    save_checkpoint(str(folder / "model.pt"), net, Preprocess((32, 32)))
    assert load(str(folder)).heldout_ids is None  # no record: unknown, not "none"
    write_heldout_ids(str(folder), ["b2", "a1", "a2"])
    assert (folder / CALIBRATION_FILE).read_text() == "a1\na2\nb2\n"
    for ref in (str(folder), str(folder / "model.pt")):
        assert load(ref).heldout_ids == frozenset({"a1", "a2", "b2"})
    write_heldout_ids(str(folder), [])
    assert load(str(folder)).heldout_ids == frozenset()


def _write_hub_cache(
    cache, repo_id: str, model, revision="0123456789abcdef0123456789abcdef01234567"
):
    """A Hugging Face cache entry as `huggingface-cli download` leaves it."""
    from timm.models import save_for_hf

    org, name = repo_id.split("/")
    root = cache / f"models--{org}--{name}"
    snapshot = root / "snapshots" / revision
    save_for_hf(model, str(snapshot), safe_serialization=True)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hf_hub_model_loads_from_a_warm_cache_offline(hub_cache):
    import timm

    torch.manual_seed(7)  # weights unlike the seeded random init
    source = timm.create_model("resnet18", pretrained=False, num_classes=0)
    source.pretrained_cfg = dict(source.pretrained_cfg, input_size=(3, 80, 80))
    _write_hub_cache(hub_cache, "testorg/tiny-reid", source)

    loaded = load("hf-hub:testorg/tiny-reid")
    assert "hf-hub" in loaded.description and loaded.embedding_dim == 512
    assert loaded.preprocess.input_size == (80, 80)  # the preprocessing came with the weights
    x = _batch(size=80)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), source.eval()(x))
    assert loaded.fingerprint != load("timm-random:resnet18", image_size=80).fingerprint


def test_hf_hub_model_absent_offline_fails_fast(hub_cache):
    with pytest.raises(ModelError, match="not in the local Hugging Face cache") as info:
        load("hf-hub:nobody/not-cached")
    assert "huggingface-cli download nobody/not-cached" in str(info.value)


@pytest.mark.parametrize("where", ["local", "folder", "s3"])
def test_checkpoint_round_trip_gives_identical_embeddings(where, tmp_path, request):
    torch.manual_seed(3)
    net = ReidNet(NetConfig(backbone="resnet18", embedding_dim=64)).eval()
    with torch.no_grad():  # a trained-looking BatchNorm, not the identity
        net.neck[1].running_mean.uniform_(-1, 1)
        net.neck[1].running_var.uniform_(0.5, 2)
    preprocess = Preprocess(input_size=(64, 48), resize_mode="letterbox")
    if where == "s3":
        path = request.getfixturevalue("s3_bucket") + "/ckpt/model.pt"
    else:
        path = str(tmp_path / "ckpt" / "model.pt")
    save_checkpoint(path, net, preprocess, meta={"epoch": 5})
    ref = str(tmp_path / "ckpt") if where == "folder" else path
    loaded = load(ref)
    assert loaded.preprocess == preprocess and loaded.embedding_dim == 64
    assert "epoch 5" in loaded.description
    x = _batch(size=64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), net(x))
    assert load(ref).fingerprint == loaded.fingerprint


def test_not_a_checkpoint_is_a_model_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ModelError, match="not a reid-ray checkpoint"):
        load(str(path))


def test_unprefixed_name_suggests_the_timm_spelling():
    with pytest.raises(ModelError, match="did you mean 'timm:resnet18'.*'timm-random:resnet18'"):
        load("resnet18")


def test_unknown_timm_architecture_is_a_model_error():
    with pytest.raises(ModelError, match="unknown timm architecture"):
        load("timm:no_such_net_123")


def test_preprocessing_keeps_the_whole_crop():
    """Re-ID resizes (or letterboxes) the whole crop: a mark at the far edge of a wide crop
    survives, where a centre crop would cut it off."""
    img = np.zeros((100, 300, 3), dtype=np.uint8)
    img[:, :20] = (0, 0, 255)  # a blue band on the left edge
    img[:, 20:] = (0, 200, 0)
    resized = Preprocess(input_size=(64, 64)).prepare(img)
    assert resized.shape == (64, 64, 3)
    assert resized[:, 0, 2].min() > 200 and resized[:, -1, 1].min() > 150
    boxed = Preprocess(input_size=(64, 64), resize_mode="letterbox").prepare(img)
    assert boxed[:, 0, 2].max() > 200  # still there
    assert boxed[0].max() == 0 and boxed[-1].max() == 0  # padded above and below
    x = Preprocess(input_size=(64, 64)).normalize(resized[None])
    assert tuple(x.shape) == (1, 3, 64, 64) and x.dtype == torch.float32
