"""CAM backbones: feature-map geometry, the logits/CAM contract, registry errors, weight loading."""
from __future__ import annotations

import socket

import pytest
import torch
import torchvision

from trainers.backbones import BACKBONES, build_backbone

# Feature map (C, h, w) at each backbone's native input side, worked out by hand.
# Conv/pool output side: floor((n + 2p - k) / s) + 1, or ceil(...) + 1 for ceil-mode pools.
EXPECTED = {
    # 64 -> pool 32 -> pool 16; last block has 128 channels
    "tiny_cnn": (64, (128, 16, 16)),
    # conv1 k11 s4 p2: floor(217/4)+1 = 55; pool k3 s2: 27; conv2 p2: 27; pool: 13; conv3-5 and
    # the two new convs are pad 1: 13 (conv5's pool removed); the last new conv has 1024 channels
    "alexnet_gap": (224, (1024, 13, 13)),
    # conv1 k7 s2 p3: floor(223/2)+1 = 112; ceil-mode pools k3 s2: ceil(109/2)+1 = 56, 28, 14;
    # inception4e stays 14 (maxpool4 dropped); new conv 832 -> 1024
    "googlenet_gap": (224, (1024, 14, 14)),
    # four 2x2 pools (the fifth removed): 224 / 16 = 14; new conv 512 -> 1024
    "vgg16_gap": (224, (1024, 14, 14)),
    # conv1 s2 112, maxpool 56, layer2 28, layer3 14, layer4 at stride 1 stays 14; 2048 channels
    "resnet50_cam": (224, (2048, 14, 14)),
    # Conv1a k3 s2 p1: floor(223/2)+1 = 112; 2a k3 p0: 110; 2b p1: 110; pool k3 s2 p1 ceil:
    # ceil(109/2)+1 = 56; 3b 1x1: 56; 4a k3 p0: 54; pool: ceil(53/2)+1 = 28; Mixed_5*, Mixed_6a
    # (stride 1) and 6b-6e and the new convs keep 28; last new conv has 1024 channels
    "inception_v3_cam": (224, (1024, 28, 28)),
}

# The module whose output is the last feature map, hooked to check forward_features independently.
LAST_MODULE = {"tiny_cnn": "features", "alexnet_gap": "extra", "googlenet_gap": "extra",
               "vgg16_gap": "extra", "resnet50_cam": "layer4", "inception_v3_cam": "extra"}

NUM_CLASSES = 5


def test_every_registered_backbone_is_tested():
    assert sorted(BACKBONES) == sorted(EXPECTED) == sorted(LAST_MODULE)


@pytest.fixture(scope="module")
def runs():
    """Per backbone: the model (eval), one input, its logits, hooked last map, forward_features."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name, (side, _) in EXPECTED.items():
        model = build_backbone(name, NUM_CLASSES).eval()
        x = torch.randn(1, 3, side, side, generator=generator)
        hooked = []
        handle = getattr(model, LAST_MODULE[name]).register_forward_hook(
            lambda module, inputs, output: hooked.append(output))
        with torch.no_grad():
            logits = model(x)
            handle.remove()
            features = model.forward_features(x)
        out[name] = (model, x, logits, hooked[0], features)
    return out


def assert_close_scaled(actual, expected, scale):
    """assert_close at a tolerance relative to `scale`: random-init activations span 1e-9 to 1e8."""
    assert scale > 0
    torch.testing.assert_close(actual / scale, expected / scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", EXPECTED)
def test_feature_map_shape_at_native_input(runs, name):
    model, _, _, _, features = runs[name]
    side, chw = EXPECTED[name]
    assert model.name == name and model.input_size == side
    assert model.feature_channels == chw[0] and model.classifier.in_features == chw[0]
    assert features.shape == (1, *chw)
    assert (features >= 0).all() and (features > 0).any()  # after the ReLU, not degenerate


@pytest.mark.parametrize("name", EXPECTED)
def test_logits_are_classifier_of_pooled_features(runs, name):
    model, _, logits, _, features = runs[name]
    expected = model.classifier(features.mean((2, 3)))
    assert logits.shape == (1, NUM_CLASSES)
    assert_close_scaled(logits, expected, expected.abs().max())


@pytest.mark.parametrize("name", EXPECTED)
def test_cam_from_contract_matches_hooked_channel_loop(runs, name):
    model, _, _, hooked, features = runs[name]
    target = 3
    weight = model.classifier.weight.detach()
    cam = torch.einsum("bchw,bc->bhw", features, weight[torch.tensor([target])])[0]
    # Independent CAM: the hooked map, weighted channel by channel, in float64.
    loop = torch.zeros(hooked.shape[2:], dtype=torch.float64)
    for c in range(hooked.shape[1]):
        loop += float(weight[target, c]) * hooked[0, c].double()
    scale = (hooked[0].double().abs() * weight[target].double().abs()[:, None, None]).sum(0).max()
    assert_close_scaled(cam.double(), loop, scale)


def test_tiny_cnn_layers_by_hand():
    model = build_backbone("tiny_cnn", 2).eval()
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = x
        for layer in model.features:
            h = layer(h)
        torch.testing.assert_close(model.forward_features(x), h)
    assert model.pretrained_parameters() == []


@pytest.mark.parametrize("num_classes", [1, 7, 1000])
def test_any_number_of_classes(num_classes):
    model = build_backbone("tiny_cnn", num_classes).eval()
    with torch.no_grad():
        assert model(torch.zeros(3, 3, 64, 64)).shape == (3, num_classes)


def test_unknown_name_lists_every_backbone():
    with pytest.raises(KeyError) as info:
        build_backbone("nope", 3)
    assert "nope" in str(info.value)
    assert all(name in str(info.value) for name in EXPECTED)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3"])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        build_backbone("tiny_cnn", bad)


def test_weights_round_trip_and_nesting(tmp_path):
    source = build_backbone("tiny_cnn", 4)
    for wrapper in (lambda sd: sd, lambda sd: {"state_dict": sd, "epoch": 3}, lambda sd: {"model": sd}):
        path = tmp_path / "w.pt"
        torch.save(wrapper(source.state_dict()), path)
        loaded = build_backbone("tiny_cnn", 4, weights=path)
        for (key, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
        assert loaded.weights_report.left_at_init == [] and loaded.weights_report.skipped == []


def test_weights_missing_or_unmatched(tmp_path):
    missing = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        build_backbone("tiny_cnn", 4, weights=missing)
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"foo.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(ValueError, match="unrelated.pt.*tiny_cnn"):
        build_backbone("tiny_cnn", 4, weights=unrelated)


def test_torchvision_file_loads_trunk_and_skips_its_fc(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet50(weights=None).state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference, cache / "resnet50-0676ba61.pth")  # torchvision's ResNet50 V1 file name
    model = build_backbone("resnet50_cam", 7, weights="imagenet")
    torch.testing.assert_close(model.conv1.weight, reference["conv1.weight"], rtol=0, atol=0)
    # layer4's conv kept its weights: only its stride changed
    torch.testing.assert_close(model.layer4[0].conv2.weight, reference["layer4.0.conv2.weight"])
    assert model.weights_report.skipped == ["fc.weight", "fc.bias"]
    assert model.weights_report.left_at_init == ["classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("name, filename", [("vgg16_gap", "vgg16-397923af.pth"),
                                            ("resnet50_cam", "resnet50-0676ba61.pth")])
def test_imagenet_weights_missing_names_the_file_and_never_downloads(tmp_path, monkeypatch, name, filename):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(FileNotFoundError) as info:
        build_backbone(name, 3, weights="imagenet")
    assert str(tmp_path / "hub" / "checkpoints" / filename) in str(info.value)


def test_tiny_cnn_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="tiny_cnn"):
        build_backbone("tiny_cnn", 3, weights="imagenet")


@pytest.mark.parametrize("name", EXPECTED)
def test_parameter_groups_partition(runs, name):
    model = runs[name][0]
    new = {id(p) for p in model.new_parameters()}
    old = {id(p) for p in model.pretrained_parameters()}
    assert not new & old
    assert new | old == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.classifier.parameters()} <= new
    if name == "vgg16_gap":
        assert {id(model.extra[0].weight), id(model.extra[0].bias)} <= new
        assert {id(p) for p in model.features.parameters()} == old
