"""CAM backbones: feature-map geometry, the logits/CAM contract, registry errors, weight loading.

Every number in docs/backbones.md is asserted here (sizes, channels, dropouts, groups, parameters).
"""
from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from trainers import backbones
from trainers.backbones import BACKBONES, LARGE_FEATURE_MAP_BACKBONES, build_backbone, fetch_imagenet_weights
from trainers.config import OptimConfig
from trainers.fills import IMAGENET_MEAN, IMAGENET_STD
from trainers.optim import build_optimizer

# Feature map (C, h, w) at each backbone's native input side, worked out by hand.
# Conv/pool output side: floor((n + 2p - k) / s) + 1, or ceil(...) + 1 for ceil-mode pools.
EXPECTED = {
    # 64 -> pool 32 -> pool 16; last block has 128 channels
    "tiny_cnn": (64, (128, 16, 16)),
    # conv1 k11 s4 p2: floor(217/4)+1 = 55; pool k3 s2: 27; conv2 p2: 27; pool: 13; conv3-5 pad 1: 13;
    # pool5 k3 at stride 1: 11; conv6, conv7 pad 1: 11; conv7 has 512 channels (CAM's prototxt)
    "alexnet_gap": (224, (512, 11, 11)),
    # conv1 k7 s2 p3: floor(223/2)+1 = 112; ceil-mode pools k3 s2: ceil(109/2)+1 = 56, 28, 14;
    # inception4e stays 14 (maxpool4 dropped); new conv 832 -> 1024
    "googlenet_gap": (224, (1024, 14, 14)),
    # four 2x2 pools (the fifth removed): 224 / 16 = 14; new conv 512 -> 1024
    "vgg16_gap": (224, (1024, 14, 14)),
    # conv1 s2 112, maxpool 56, layer2 28, layer3 14, layer4 at stride 1 stays 14; 2048 channels
    "resnet50_cam": (224, (2048, 14, 14)),
    # Conv1a k3 s2 p1: floor(223/2)+1 = 112; 2a k3 p0: 110; 2b p1: 110; pool k3 s2 p1 ceil:
    # ceil(109/2)+1 = 56; 3b 1x1: 56; 4a k3 p0: 54; pool: ceil(53/2)+1 = 28; Mixed_5b-d: 28; pool k3
    # s2 p0 ceil: ceil(25/2)+1 = 14; Mixed_6a (stride 1), 6b-6e and the new convs keep 14; 1024 channels
    "inception_v3_cam": (224, (1024, 14, 14)),
    # TensorFlow 'same' padding: side ceil(n / s); stem s2: 112; blocks 1, 3, 5 s2: 56, 28, 14; block 11
    # at stride 1: 14; 1x1 head conv to 1280 channels
    "efficientnet_lite0_cam": (224, (1280, 14, 14)),
}

# With large_feature_map (wsolevaluation's --large_feature_map), at 224.
EXPECTED_LARGE = {
    "vgg16_gap": (1024, 28, 28),  # pool4 removed too: three 2x2 pools, 224 / 8 = 28
    "resnet50_cam": (2048, 28, 28),  # layer3 at stride 1 too: layer2's 28 is kept
    "inception_v3_cam": (1024, 28, 28),  # no pool after Mixed_5d: the stem's 28 is kept
}
# The large maps cost 3-4x the default ones, so they run at LARGE_CHECK_SIDE and a hand-written
# geometry (each spatial layer's output side) carries the check to 224.
LARGE_CHECK_SIDE = 80


def out_side(n: int, kernel: int, stride: int = 1, padding: int = 0, ceil: bool = False) -> int:
    """Output side of a conv or pool: floor((n + 2p - k) / s) + 1, or ceil(...) + 1 in ceil mode."""
    span = n + 2 * padding - kernel
    return (-(-span // stride) if ceil else span // stride) + 1


def large_map_side(name: str, n: int) -> int:
    """The side of a large-map backbone's feature map at input side n, layer by layer (size-keeping
    layers, the padded 3x3 convs and the Mixed blocks, left out)."""
    if name == "vgg16_gap":  # three 2x2 stride-2 pools (pool4 and pool5 removed)
        for _ in range(3):
            n = out_side(n, 2, 2)
        return n
    if name == "resnet50_cam":  # conv1 7x7 s2 p3, maxpool 3x3 s2 p1, layer2's 3x3 s2 p1; layer3, 4 at s1
        return out_side(out_side(out_side(n, 7, 2, 3), 3, 2, 1), 3, 2, 1)
    # inception_v3_cam: Conv2d_1a 3x3 s2 p1, 2a 3x3, 2b 3x3 p1, pool 3x3 s2 p1 ceil, 3b 1x1, 4a 3x3,
    # pool 3x3 s2 p1 ceil; no pool before Mixed_6a (stride 1)
    n = out_side(out_side(out_side(n, 3, 2, 1), 3), 3, 1, 1)
    n = out_side(out_side(out_side(n, 3, 2, 1, ceil=True), 1), 3)
    return out_side(n, 3, 2, 1, ceil=True)

# Parameters without the classifier (whose count is (C + 1) x K for K classes), of which in new
# layers (not in a torchvision file) and in the fast group (the reference's 10x group).
PARAMETERS = {  # name: (without classifier, new layers, fast group without classifier)
    "tiny_cnn": (97_680, 97_680, 0),
    "alexnet_gap": (4_240_192, 1_770_496, 0),  # conv6 128*512*9+512, conv7 256*512*9+512 (groups 2)
    "googlenet_gap": (7_108_800, 3_834_880, 0),  # CAM_conv 416*1024*9+1024 (groups 2)
    "vgg16_gap": (19_434_304, 4_719_616, 4_719_616),  # conv6 512*1024*9+1024
    "resnet50_cam": (23_508_032, 0, 14_964_736),  # layer4
    "inception_v3_cam": (25_482_976, 16_517_120, 16_517_120),  # 768*1024*9+1024 + 1024*1024*9+1024
    "efficientnet_lite0_cam": (3_371_008, 0, 0),  # the weights file's tensors without _fc (tests/test_efficientnet.py)
}
# The totals docs/backbones.md lists: at 1000 classes (ImageNet) and 200 (CUB).
TOTALS = {
    "tiny_cnn": (226_680, 123_480),
    "alexnet_gap": (4_753_192, 4_342_792),
    "googlenet_gap": (8_133_800, 7_313_800),
    "vgg16_gap": (20_459_304, 19_639_304),
    "resnet50_cam": (25_557_032, 23_917_832),
    "inception_v3_cam": (26_507_976, 25_687_976),
    "efficientnet_lite0_cam": (4_652_008, 3_627_208),
}

# Every nn.Dropout, in order: (module name, p).
DROPOUTS = {
    "tiny_cnn": [], "googlenet_gap": [], "vgg16_gap": [], "resnet50_cam": [],
    "alexnet_gap": [("head_dropout", 0.5)],  # CAM's drop8, on the pooled vector
    "inception_v3_cam": [("extra.0", 0.5), ("extra.3", 0.5), ("extra.6", 0.5)],  # wsolevaluation's three
    "efficientnet_lite0_cam": [("head_dropout", 0.2)],  # Lite0's, on the pooled vector
}

# wsolevaluation's 10x group (main.py 72-77, 141-153): a parameter is matched when its name CONTAINS
# one of the patterns (util.string_contains_any); matched ones are the 10x group for ResNet, the 1x
# group for VGG and Inception. Our classifier is their fc.
WSOL_PATTERNS = {"vgg16_gap": ["features."], "resnet50_cam": ["layer4.", "fc."],
                 "inception_v3_cam": ["Mixed", "Conv2d_1", "Conv2d_2", "Conv2d_3", "Conv2d_4"]}


def in_reference_10x_group(backbone: str, parameter: str) -> bool:
    if backbone not in WSOL_PATTERNS:  # CAM's prototxts (lr_mult 1 everywhere), HaS's one SGD state, tiny_cnn
        return False
    reference_name = "fc." + parameter.removeprefix("classifier.") if parameter.startswith("classifier.") else parameter
    matched = any(pattern in reference_name for pattern in WSOL_PATTERNS[backbone])
    return matched if backbone == "resnet50_cam" else not matched


# torchvision's models on the meta device (no memory, no init): the keys and shapes of their files.
TORCHVISION = {
    "alexnet_gap": lambda: torchvision.models.alexnet(),
    "googlenet_gap": lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False),
    "vgg16_gap": lambda: torchvision.models.vgg16(init_weights=False),
    "resnet50_cam": lambda: torchvision.models.resnet50(),
    "inception_v3_cam": lambda: torchvision.models.inception_v3(aux_logits=False, init_weights=False),
}

# The module whose output is the last feature map, hooked to check forward_features independently.
LAST_MODULE = {"tiny_cnn": "features", "alexnet_gap": "extra", "googlenet_gap": "extra",
               "vgg16_gap": "extra", "resnet50_cam": "layer4", "inception_v3_cam": "extra",
               "efficientnet_lite0_cam": "_head_act"}

NUM_CLASSES = 5


def test_every_registered_backbone_is_tested():
    assert sorted(BACKBONES) == sorted(EXPECTED) == sorted(LAST_MODULE) == sorted(PARAMETERS) == sorted(DROPOUTS)
    assert sorted(LARGE_FEATURE_MAP_BACKBONES) == sorted(EXPECTED_LARGE)


@pytest.fixture(scope="module")
def runs():
    """Per backbone: the model (eval), its logits of one input at its native side, and the last
    module's map (hooked) of that forward. One forward each: these are the file's slow part."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name, (side, _) in EXPECTED.items():
        model = build_backbone(name, NUM_CLASSES).eval()
        logits, hooked = forward_hooked(model, LAST_MODULE[name], torch.randn(1, 3, side, side, generator=generator))
        out[name] = (model, logits, hooked)
    return out


def forward_hooked(model, module_name, x):
    """(logits, output of the named module) of one no-grad forward."""
    hooked = []
    handle = getattr(model, module_name).register_forward_hook(lambda module, inputs, output: hooked.append(output))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    return logits, hooked[0]


@pytest.fixture(scope="module")
def large_runs():
    """Per backbone with a large-map setting: the model (eval) built with it, its features at
    LARGE_CHECK_SIDE."""
    generator = torch.Generator().manual_seed(2)
    out = {}
    for name in EXPECTED_LARGE:
        model = build_backbone(name, NUM_CLASSES, large_feature_map=True).eval()
        x = torch.randn(1, 3, LARGE_CHECK_SIDE, LARGE_CHECK_SIDE, generator=generator)
        with torch.no_grad():
            out[name] = (model, model.forward_features(x))
    return out


def assert_close_scaled(actual, expected, scale):
    """assert_close at a tolerance relative to `scale`: random-init activations span 1e-9 to 1e8."""
    assert scale > 0
    torch.testing.assert_close(actual / scale, expected / scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", EXPECTED)
def test_feature_map_shape_at_native_input(runs, name):
    model, _, features = runs[name]
    side, chw = EXPECTED[name]
    assert model.name == name and model.input_size == side
    assert model.feature_channels == chw[0] and model.classifier.in_features == chw[0]
    assert features.shape == (1, *chw)
    assert (features >= 0).all() and (features > 0).any()  # after the ReLU, not degenerate


@pytest.mark.parametrize("name", EXPECTED)
def test_logits_are_classifier_of_pooled_features(runs, name):
    model, logits, features = runs[name]
    expected = model.classifier(features.mean((2, 3)))
    assert logits.shape == (1, NUM_CLASSES)
    assert_close_scaled(logits, expected, expected.abs().max())


@pytest.mark.parametrize("name", EXPECTED)
def test_forward_features_is_the_last_modules_map(runs, name):
    model = runs[name][0]  # at 64x64 (every backbone's map is still >= 1x1): cheap
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    logits, hooked = forward_hooked(model, LAST_MODULE[name], x)
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(features, hooked, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(features), logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", EXPECTED)
def test_cam_from_contract_matches_hooked_channel_loop(runs, name):
    model, _, hooked = runs[name]
    features = hooked
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
    assert [m.kernel_size for m in model.features if isinstance(m, torch.nn.MaxPool2d)] == [2, 2]
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


@pytest.fixture
def file_server(tmp_path):
    """A static file server on 127.0.0.1: (its folder, its base URL, the paths it was asked for)."""
    folder = tmp_path / "served"
    folder.mkdir()
    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_port}", requested
    server.shutdown()
    server.server_close()


def test_imagenet_weights_are_downloaded_into_the_hub_cache_once(runs, tmp_path, monkeypatch, file_server):
    folder, base_url, requested = file_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    trunk = {k: v.clone() for k, v in runs["alexnet_gap"][0].state_dict().items() if k.startswith("features.")}
    torch.save(trunk, folder / "payload")
    digest = hashlib.sha256((folder / "payload").read_bytes()).hexdigest()
    filename = f"alexnet-{digest[:8]}.pth"  # torchvision's naming: torch.hub checks the file against it
    (folder / "payload").rename(folder / filename)
    monkeypatch.setattr(backbones, "imagenet_weights_url", lambda name: f"{base_url}/{filename}")

    model = build_backbone("alexnet_gap", 3, weights="imagenet")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / filename
    assert cached.is_file() and requested == [f"/{filename}"]
    for key, value in trunk.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert fetch_imagenet_weights("alexnet_gap") == cached and requested == [f"/{filename}"]  # from the cache


def test_a_download_with_the_wrong_hash_is_refused_and_leaves_no_file(tmp_path, monkeypatch, file_server):
    folder, base_url, _ = file_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, folder / "alexnet-00000000.pth")
    monkeypatch.setattr(backbones, "imagenet_weights_url", lambda name: f"{base_url}/alexnet-00000000.pth")
    with pytest.raises(FileNotFoundError, match="invalid hash value") as info:
        fetch_imagenet_weights("alexnet_gap")
    assert f"{base_url}/alexnet-00000000.pth" in str(info.value)
    assert list((tmp_path / "torch" / "hub" / "checkpoints").iterdir()) == []


def test_imagenet_weights_offline_is_one_error_naming_the_url_and_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with socket.socket() as probe:  # a port nobody listens on: the connection is refused, as offline
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/resnet50-0676ba61.pth"
    monkeypatch.setattr(backbones, "imagenet_weights_url", lambda name: url)
    with pytest.raises(FileNotFoundError) as info:
        build_backbone("resnet50_cam", 3, weights="imagenet")
    message = str(info.value)
    assert url in message and str(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message


def test_a_silent_network_fails_after_the_timeout_instead_of_hanging(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert backbones.DOWNLOAD_TIMEOUT_S == 60  # docs/backbones.md
    monkeypatch.setattr(backbones, "DOWNLOAD_TIMEOUT_S", 0.5)
    before = socket.getdefaulttimeout()
    with socket.socket() as silent:  # accepts connections (its backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/vgg16-397923af.pth"
        monkeypatch.setattr(backbones, "imagenet_weights_url", lambda name: url)
        start = time.monotonic()
        with pytest.raises(FileNotFoundError, match="timed out"):
            fetch_imagenet_weights("vgg16_gap")
        assert time.monotonic() - start < 10
    assert socket.getdefaulttimeout() == before


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


@pytest.mark.parametrize("name", EXPECTED)
def test_fast_group_is_the_references_10x_group(runs, name):
    model = runs[name][0]
    fast = {id(p) for p in model.fast_lr_parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in fast]
    assert names == [n for n, _ in model.named_parameters() if in_reference_10x_group(name, n)]
    if name == "resnet50_cam":  # the case that differs from "the new layers": layer4 is pretrained
        assert any(n.startswith("layer4.") for n in names) and names[-2:] == ["classifier.weight", "classifier.bias"]


def test_optimizer_trains_the_fast_group_at_fast_lr_mult(runs):
    resnet = runs["resnet50_cam"][0]
    rest, fast = build_optimizer(resnet, OptimConfig(lr=0.01), fast_lr_mult=10).param_groups
    assert rest["lr"] == 0.01 and fast["lr"] == pytest.approx(0.1) and fast["lr_mult"] == 10
    assert {id(p) for p in fast["params"]} == {id(p) for p in [*resnet.layer4.parameters(),
                                                                *resnet.classifier.parameters()]}
    assert len(rest["params"]) + len(fast["params"]) == len(list(resnet.parameters()))
    # A backbone whose references train every layer at one rate: one group, the multiplier unused.
    (only,) = build_optimizer(runs["alexnet_gap"][0], OptimConfig(lr=0.01), fast_lr_mult=10).param_groups
    assert only["lr"] == 0.01 and len(only["params"]) == len(list(runs["alexnet_gap"][0].parameters()))


def test_fast_lr_prefixes_must_name_parameters():
    with pytest.raises(ValueError, match=r"fast_lr_prefixes \['layer9.'\] match no parameter"):
        backbones.CamBackbone("x", 8, trunk={}, new={"conv": nn.Conv2d(3, 4, 3)}, feature_channels=4,
                              num_classes=2, fast_lr_prefixes=("conv.", "layer9."))


@pytest.mark.parametrize("name", EXPECTED)
def test_parameter_counts(runs, name):
    model = runs[name][0]
    channels = model.feature_channels
    without_classifier, new_layers, fast_without_classifier = PARAMETERS[name]
    assert sum(p.numel() for p in model.parameters()) == without_classifier + (channels + 1) * NUM_CLASSES
    assert sum(p.numel() for p in model.new_parameters()) == new_layers + (channels + 1) * NUM_CLASSES
    fast = sum(p.numel() for p in model.fast_lr_parameters())
    assert fast in (fast_without_classifier, fast_without_classifier + (channels + 1) * NUM_CLASSES)
    assert (fast == 0) == (fast_without_classifier == 0)
    assert TOTALS[name] == tuple(without_classifier + (channels + 1) * k for k in (1000, 200))


@pytest.mark.parametrize("name", EXPECTED)
def test_dropouts(runs, name):
    model = runs[name][0]
    assert [(n, m.p) for n, m in model.named_modules() if isinstance(m, nn.Dropout)] == DROPOUTS[name]


def test_inception_v3_cam_head_is_wsolevaluations(runs):
    # dropout, conv 768->1024, ReLU, dropout, conv 1024->1024, ReLU, dropout (before the classifier)
    model = runs["inception_v3_cam"][0]
    assert [type(m).__name__ for m in model.extra] == ["Dropout", "Conv2d", "ReLU", "Dropout", "Conv2d", "ReLU",
                                                       "Dropout"]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in model.extra[1::3]] == [
        (768, 1024, (3, 3), (1, 1)), (1024, 1024, (3, 3), (1, 1))]


def test_alexnet_gap_dropout_acts_on_the_pooled_vector(runs):
    model = runs["alexnet_gap"][0]
    features = torch.rand(2, 512, 11, 11, generator=torch.Generator().manual_seed(3))
    model.train()
    try:
        torch.manual_seed(0)
        logits = model.forward_head(features)
        torch.manual_seed(0)
        expected = model.classifier(F.dropout(features.mean((2, 3)), 0.5, training=True))
    finally:
        model.eval()
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def conv_specs(module):
    return [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0], c.groups)
            for c in module.modules() if isinstance(c, nn.Conv2d)]


def test_alexnet_gap_is_cams_alexnet_plus_cam(runs):
    model = runs["alexnet_gap"][0]
    # torchvision's conv1-conv5 (in, out, kernel, stride, pad, groups); then conv6, conv7 of the prototxt
    assert conv_specs(model.features) == [(3, 64, 11, 4, 2, 1), (64, 192, 5, 1, 2, 1), (192, 384, 3, 1, 1, 1),
                                          (384, 256, 3, 1, 1, 1), (256, 256, 3, 1, 1, 1)]
    assert conv_specs(model.extra) == [(256, 512, 3, 1, 1, 2), (512, 512, 3, 1, 1, 2)]
    pools = [(m.kernel_size, m.stride) for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert pools == [(3, 2), (3, 2), (3, 1)]  # pool1, pool2, pool5 at stride 1
    assert isinstance(model.features[12], nn.MaxPool2d) and len(model.features) == 13


def test_vgg16_gap_is_wsolevaluations_vgg_cam(runs, large_runs):
    for model, pools in ((runs["vgg16_gap"][0], 4), (large_runs["vgg16_gap"][0], 3)):
        convs = conv_specs(model.features)
        assert [c[1] for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
        assert {c[2:] for c in convs} == {(3, 1, 1, 1)}
        assert [(m.kernel_size, m.stride) for m in model.features if isinstance(m, nn.MaxPool2d)] == [(2, 2)] * pools
        assert conv_specs(model.extra) == [(512, 1024, 3, 1, 1, 1)]


def test_inception_v3_cam_stem_and_mixed_6a_are_wsolevaluations(runs):
    model = runs["inception_v3_cam"][0]
    assert model.Conv2d_1a_3x3.conv.stride == (2, 2) and model.Conv2d_1a_3x3.conv.padding == (1, 1)
    for pool in (model.maxpool1, model.maxpool2):
        assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == (3, 2, 1, True)
    for conv in (model.Mixed_6a.branch3x3.conv, model.Mixed_6a.branch3x3dbl_3.conv):
        assert conv.stride == (1, 1) and conv.padding == (1, 1)


def test_googlenet_gap_new_conv_is_grouped(runs):
    model = runs["googlenet_gap"][0]
    assert conv_specs(model.extra) == [(832, 1024, 3, 1, 1, 2)]
    assert model.stage_names[-2:] == ("inception4e", "extra")
    assert model.inception3a.branch3[1].conv.kernel_size == (3, 3)  # torchvision's, where GoogLeNet has 5x5


@pytest.mark.parametrize("name", TORCHVISION)
def test_trunk_keys_and_shapes_are_torchvisions(runs, large_runs, name):
    with torch.device("meta"):
        reference = {k: v.shape for k, v in TORCHVISION[name]().state_dict().items()}
    models = [runs[name][0]] + ([large_runs[name][0]] if name in large_runs else [])
    for model in models:
        new = tuple(f"{module_name}." for module_name in model.new_module_names)
        trunk = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(new)}
        mismatched = [k for k, shape in trunk.items() if reference.get(k) != shape]
        assert trunk and mismatched == []


@pytest.mark.parametrize("name", EXPECTED_LARGE)
def test_large_feature_map_at_224(large_runs, name):
    model, features = large_runs[name]
    channels, side, _ = EXPECTED_LARGE[name]
    assert large_map_side(name, 224) == side and model.input_size == 224
    small = large_map_side(name, LARGE_CHECK_SIDE)  # 10: the geometry holds at a size it was not written for
    assert features.shape == (1, channels, small, small)
    assert (features >= 0).all() and (features > 0).any()


def test_large_feature_map_changes_what_wsolevaluation_changes(runs, large_runs):
    vgg, vgg_large = runs["vgg16_gap"][0], large_runs["vgg16_gap"][0]
    assert isinstance(vgg.features[23], nn.MaxPool2d) and isinstance(vgg_large.features[23], nn.Identity)
    assert len(vgg.features) == len(vgg_large.features) == 30  # pool5 (features.30) dropped in both
    resnet, resnet_large = runs["resnet50_cam"][0], large_runs["resnet50_cam"][0]
    assert [resnet.layer3[0].conv2.stride, resnet.layer4[0].conv2.stride] == [(2, 2), (1, 1)]
    assert [resnet_large.layer3[0].conv2.stride, resnet_large.layer4[0].conv2.stride] == [(1, 1), (1, 1)]
    assert [resnet_large.layer3[0].downsample[0].stride, resnet_large.layer4[0].downsample[0].stride] == [(1, 1)] * 2
    inception, inception_large = runs["inception_v3_cam"][0], large_runs["inception_v3_cam"][0]
    pool = inception.maxpool3
    assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == (3, 2, 0, True)
    assert inception.stage_names.index("maxpool3") == inception.stage_names.index("Mixed_6a") - 1
    assert "maxpool3" not in inception_large.stage_names
    for name in EXPECTED_LARGE:  # the same keys and shapes: the same ImageNet file loads either way
        default, large = runs[name][0].state_dict(), large_runs[name][0].state_dict()
        assert {k: v.shape for k, v in default.items()} == {k: v.shape for k, v in large.items()}


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - set(EXPECTED_LARGE)))
def test_large_feature_map_is_refused_where_wsolevaluation_has_none(name):
    with pytest.raises(ValueError, match=f"large_feature_map: backbone '{name}' has no such setting"):
        build_backbone(name, 3, large_feature_map=True)


@pytest.mark.parametrize("name", EXPECTED)
def test_input_normalisation(name):
    # torchvision's weights expect ImageNet's statistics (wsolevaluation data_loaders.py 30-31 too);
    # tiny_cnn has no weights: the data's own statistics; the Lite weights were trained on [-1, 1].
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (IMAGENET_MEAN, IMAGENET_STD) == imagenet
    expected = {"tiny_cnn": None, "efficientnet_lite0_cam": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}.get(name, imagenet)
    assert backbones.INPUT_NORMALIZATION[name] == backbones.input_normalization(name) == expected
