"""Specification of Hide-and-Seek hiding: parameters, the masking kernel, fills and the module."""
import math

import pytest
import torch
import torch.nn.functional as F

from has_reference import loop_hide
from trainers.fills import FILL_STRATEGIES, FillStats
from trainers.hide import (
    PAPER_MIXTURE, HideAndSeek, HideParams, apply_hide_mask, format_mixture, hide, hide_mask, parse_mixture, sample_hide_params,
)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_mask_of_a_given_grid_has_these_exact_pixels():
    # A 5x7 image, patches of 2: a 3x4 grid whose last row and column are partial (1 pixel).
    grid = torch.tensor([[[1, 0, 0, 1],
                          [0, 1, 0, 0],
                          [1, 0, 1, 1]]], dtype=torch.bool)
    mask = hide_mask(HideParams(torch.tensor([2]), grid), 5, 7)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0, 1],
                             [1, 1, 0, 0, 0, 0, 1],
                             [0, 0, 1, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0], expected)


def test_each_image_uses_its_own_size_on_the_shared_grid():
    # Grid cells sized for the smallest size (2); the image drawn with size 3 reads cells (i, j) of
    # its own 3-pixel grid: rows 0-2 -> cell row 0, rows 3-4 -> cell row 1.
    grid = torch.zeros((2, 3, 3), dtype=torch.bool)
    grid[0, 2, 0] = True  # size 2: rows 4, cols 0-1
    grid[1, 1, 0] = True  # size 3: rows 3-4, cols 0-2
    mask = hide_mask(HideParams(torch.tensor([2, 3]), grid), 5, 5)
    expected0 = torch.zeros((5, 5), dtype=torch.bool)
    expected0[4, 0:2] = True
    expected1 = torch.zeros((5, 5), dtype=torch.bool)
    expected1[3:5, 0:3] = True
    assert torch.equal(mask[0], expected0)
    assert torch.equal(mask[1], expected1)


def test_hide_fills_exactly_the_masked_pixels_and_keeps_the_rest():
    images = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)
    params = HideParams(torch.tensor([2, 0]), torch.ones((2, 3, 4), dtype=torch.bool))
    out = hide(images, params, torch.tensor([-1.0, -2.0, -3.0]))
    assert torch.equal(out[0], torch.tensor([-1.0, -2.0, -3.0]).view(3, 1, 1).expand(3, 5, 7))
    assert torch.equal(out[1], images[1])  # size 0: the image stays whole


@pytest.mark.parametrize("mixture", [{4: 1}, {16: 1}, {7: 1}, PAPER_MIXTURE, {0: 1, 3: 2, 10: 1}])
@pytest.mark.parametrize("fill", [0.0, "per_channel", "per_channel_4d", "per_image", "per_image_scalar", "per_pixel",
                                  "per_row", "per_plane_2d"])
def test_vectorised_hide_equals_the_per_patch_loop(mixture, fill):
    """On a CPU, float32: the one-pass kernel (trainers/hide_cpu.py), out of place and in place; in
    channels_last: torch's masked path. Every fill shape the strategies return."""
    images = torch.randn(6, 3, 60, 60, generator=generator(1))
    params = sample_hide_params(images.shape, mixture, 0.5, generator(2))
    fill = {"per_channel": torch.tensor([0.5, -0.5, 2.0]),
            "per_channel_4d": torch.tensor([0.5, -0.5, 2.0]).view(1, 3, 1, 1),
            "per_image": torch.randn(6, 3, 1, 1, generator=generator(4)),
            "per_pixel": torch.randn(6, 3, 60, 60, generator=generator(3)),
            "per_image_scalar": torch.randn(6, 1, 1, 1, generator=generator(6)),
            "per_row": torch.randn(1, 3, 60, 1, generator=generator(5)),
            "per_plane_2d": torch.randn(60, 60, generator=generator(7))}.get(fill, fill)
    expected = loop_hide(images, params.sizes.tolist(), params.grid, fill)
    assert torch.equal(hide(images, params, fill), expected)
    batch = images.clone()
    assert hide(batch, params, fill, inplace=True) is batch and torch.equal(batch, expected)
    channels_last = images.to(memory_format=torch.channels_last)
    assert torch.equal(hide(channels_last, params, fill), expected)


def test_size_zero_leaves_every_pixel_untouched():
    images = torch.randn(8, 3, 32, 32, generator=generator())
    params = sample_hide_params(images.shape, {0: 1.0}, 1.0, generator())
    assert torch.equal(hide(images, params, 123.0), images)


def test_hidden_fraction_matches_p_hide_within_binomial_tolerance():
    p, images, size = 0.3, 1000, 16
    params = sample_hide_params((images, 3, 64, 64), {size: 1}, p, generator())
    mask = hide_mask(params, 64, 64)
    patches = images * (64 // size) ** 2  # each patch is hidden independently
    tolerance = 5 * math.sqrt(p * (1 - p) / patches)
    assert abs(mask.float().mean().item() - p) < tolerance


def test_mixture_frequencies_follow_the_weights():
    count = 8000
    params = sample_hide_params((count, 3, 32, 32), {0: 1, 8: 2, 16: 1}, 0.5, generator())
    for size, expected in {0: 0.25, 8: 0.5, 16: 0.25}.items():
        share = (params.sizes == size).float().mean().item()
        assert abs(share - expected) < 5 * math.sqrt(expected * (1 - expected) / count)


def test_p_hide_one_hides_every_pixel_and_zero_none():
    images = torch.randn(4, 3, 20, 20, generator=generator())
    every = sample_hide_params(images.shape, {6: 1}, 1.0, generator())
    none = sample_hide_params(images.shape, {6: 1}, 0.0, generator())
    assert hide_mask(every, 20, 20).all()
    assert not hide_mask(none, 20, 20).any()


def test_same_seed_gives_the_same_result_and_another_seed_another():
    images = torch.randn(4, 3, 64, 64, generator=generator(5))
    module = lambda seed: HideAndSeek(PAPER_MIXTURE, 0.5, "gaussian_noise", generator=generator(seed))  # noqa: E731
    assert torch.equal(module(7)(images), module(7)(images))
    assert not torch.equal(module(7)(images), module(8)(images))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_and_memory_format_are_preserved(dtype):
    images = torch.randn(4, 3, 32, 32, generator=generator()).to(dtype).contiguous(memory_format=torch.channels_last)
    out = HideAndSeek({8: 1}, 0.5, "dataset_mean", generator=generator())(images)
    assert out.dtype == dtype and out.device == images.device
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_hiding_runs_on_the_gpu_and_stays_there():
    images = torch.randn(4, 3, 32, 32, device="cuda")
    module = HideAndSeek(PAPER_MIXTURE, 0.5, "shuffle", generator=torch.Generator("cuda").manual_seed(0))
    out = module(images)
    assert out.device == images.device
    params = sample_hide_params(images.shape, {8: 1}, 0.5, torch.Generator("cuda").manual_seed(0))
    expected = loop_hide(images.cpu(), params.sizes.tolist(), params.grid.cpu(), 0.0)
    assert torch.equal(hide(images, params, 0.0).cpu(), expected)


def test_eval_mode_never_hides():
    images = torch.randn(4, 3, 32, 32, generator=generator())
    module = HideAndSeek({8: 1}, 1.0, "zero", generator=generator()).eval()
    assert module(images) is images
    assert not torch.equal(module.train()(images), images)


def test_wrong_generator_device_is_a_clear_error():
    module = HideAndSeek({8: 1}, 0.5, generator=generator())
    with pytest.raises(ValueError, match="generator: on cpu, the batch is on meta"):
        module(torch.empty(2, 3, 16, 16, device="meta"))


# ---- fills -----------------------------------------------------------------------------------

STATS = FillStats.from_normalization([0.4, 0.5, 0.6], [0.2, 0.25, 0.3], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def hidden_pixels(fill_name, images, seed=0):
    """Hide everything with `fill_name` and return the output."""
    module = HideAndSeek({4: 1}, 1.0, fill_name, STATS, generator(seed))
    return module(images)


def test_fill_stats_are_the_normalised_dataset_statistics():
    assert torch.allclose(STATS.mean, torch.tensor([(0.4 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.6 - 0.406) / 0.225]))
    assert torch.allclose(STATS.std, torch.tensor([0.2 / 0.229, 0.25 / 0.224, 0.3 / 0.225]))
    assert torch.allclose(STATS.black, torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))
    assert torch.allclose(STATS.white, torch.tensor([0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225]))


def test_dataset_mean_and_zero_fill_exact_per_channel_values():
    images = torch.randn(2, 3, 8, 8, generator=generator())
    assert torch.equal(hidden_pixels("dataset_mean", images), STATS.mean.view(1, 3, 1, 1).expand(2, 3, 8, 8))
    assert torch.equal(hidden_pixels("zero", images), STATS.black.view(1, 3, 1, 1).expand(2, 3, 8, 8))


def test_image_mean_fills_each_image_with_its_own_mean_colour():
    images = torch.randn(2, 3, 8, 8, generator=generator())
    expected = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    assert torch.allclose(hidden_pixels("image_mean", images), expected)


def test_blur_fills_with_the_image_seen_at_low_resolution():
    images = torch.randn(2, 3, 64, 64, generator=generator())
    expected = F.interpolate(F.adaptive_avg_pool2d(images, 8), size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(hidden_pixels("blur", images), expected)


def test_shuffle_fills_with_the_same_region_of_another_image():
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 8, 8).contiguous()
    out = hidden_pixels("shuffle", images, seed=3)
    sources = out[:, 0, 0, 0].long()  # image b now shows image sources[b] everywhere
    assert torch.equal(out, images[sources])
    assert (sources != torch.arange(5)).all()  # never its own pixels
    assert sorted(sources.tolist()) == [0, 1, 2, 3, 4]  # a permutation of the batch


def test_noise_fills_have_the_requested_statistics():
    images = torch.zeros(16, 3, 64, 64)
    gaussian = hidden_pixels("gaussian_noise", images)
    assert torch.allclose(gaussian.mean(dim=(0, 2, 3)), STATS.mean, atol=0.02)
    assert torch.allclose(gaussian.std(dim=(0, 2, 3)), STATS.std, rtol=0.02)
    uniform = hidden_pixels("uniform_noise", images)
    low, high = uniform.amin(dim=(0, 2, 3)), uniform.amax(dim=(0, 2, 3))
    assert (low >= STATS.black).all() and (high <= STATS.white).all()
    assert torch.allclose(uniform.mean(dim=(0, 2, 3)), (STATS.black + STATS.white) / 2, atol=0.02)


def test_the_fill_registry_holds_the_named_strategies():
    assert set(FILL_STRATEGIES.names()) >= {
        "dataset_mean", "zero", "image_mean", "gaussian_noise", "uniform_noise", "blur", "shuffle"}
    for name in FILL_STRATEGIES:
        assert FILL_STRATEGIES[name].__doc__, f"{name} needs its one-line rationale"


# ---- mixtures as values ------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected, name", [
    ("none", {0: 1.0}, "none"),
    (0, {0: 1.0}, "none"),
    (16, {16: 1.0}, "16"),
    ("32", {32: 1.0}, "32"),
    ("mixed:0,16,32,44,56", PAPER_MIXTURE, "mixed:0,16,32,44,56"),
    ({16: 1, 32: 3}, {16: 1.0, 32: 3.0}, "weighted:16=0.25,32=0.75"),
    ("weighted:16=0.25,32=0.75", {16: 0.25, 32: 0.75}, "weighted:16=0.25,32=0.75"),
])
def test_mixtures_parse_and_print_readably(spec, expected, name):
    assert parse_mixture(spec) == expected
    assert format_mixture(parse_mixture(spec)) == name
    assert parse_mixture(format_mixture(expected)) == pytest.approx(
        {s: w / sum(expected.values()) for s, w in expected.items()} if name.startswith("weighted") else expected)


# ---- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("mixture, message", [
    ({16: -1.0}, r"weight -1.0 of size 16 is not allowed"),
    ({16: 0.0, 32: 0}, r"all weights are zero"),
    ({-4: 1.0}, r"patch size -4 is not allowed"),
    ({300: 1.0}, r"patch size 300 is larger than the image 64x64; allowed sizes: 0..64"),
    ({}, r"not a non-empty mapping"),
    ("mixed:a,b", r"'mixed:a,b' is not a mixture; allowed"),
])
def test_invalid_mixtures_are_refused_with_the_value_and_what_is_allowed(mixture, message):
    with pytest.raises(ValueError, match=message):
        sample_hide_params((2, 3, 64, 64), parse_mixture(mixture) if isinstance(mixture, str) else mixture,
                           0.5, generator())


@pytest.mark.parametrize("p_hide", [-0.1, 1.5, "half"])
def test_p_hide_outside_zero_one_is_refused(p_hide):
    with pytest.raises(ValueError, match=r"p_hide: .* is not allowed; a probability in \[0, 1\]"):
        HideAndSeek({16: 1}, p_hide)


def test_unknown_fill_lists_the_valid_names():
    with pytest.raises(KeyError) as error:
        HideAndSeek({16: 1}, 0.5, "pink")
    assert str(error.value).startswith("unknown fill strategy 'pink'; valid: dataset_mean, zero, image_mean")


def test_mask_and_fill_shape_mismatches_are_refused():
    images = torch.zeros(2, 3, 8, 8)
    params = sample_hide_params((3, 3, 8, 8), {4: 1}, 0.5, generator())
    with pytest.raises(ValueError, match="params: drawn for 3 images, the batch has 2"):
        hide(images, params, 0.0)
    params = sample_hide_params(images.shape, {4: 1}, 0.5, generator())
    with pytest.raises(ValueError, match=r"fill: shape \(5,\) does not broadcast to the batch"):
        hide(images, params, torch.zeros(5))


@pytest.mark.parametrize("fill", [torch.tensor([0.1, -0.2, 0.3]), torch.full((2, 3, 8, 8), 0.7), 0.5])
def test_hiding_in_place_writes_the_same_pixels_into_the_batch_itself(fill):
    # The engine hides its own normalised batch in place: the same values as the masked copy.
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    params = sample_hide_params(images.shape, {2: 1.0, 4: 1.0}, 0.5, torch.Generator().manual_seed(1))
    mask = hide_mask(params, 8, 8)
    copy = apply_hide_mask(images, mask, fill)
    batch = images.clone()
    result = apply_hide_mask(batch, mask, fill, inplace=True)
    assert result is batch and torch.equal(result, copy)
    assert torch.equal(copy[~mask[:, None].expand_as(copy)], images[~mask[:, None].expand_as(images)])


def test_the_cpu_kernel_copies_kept_pixels_bit_for_bit_nan_and_negative_zero_included():
    """hide_cpu selects bit patterns: a kept NaN stays that NaN, a kept -0.0 stays -0.0, a hidden one
    becomes the fill, in place and out of place, as the per-patch loop (compared bit by bit)."""
    images = torch.randn(3, 3, 12, 12, generator=generator(7))
    images[:, :, ::3, ::2] = float("nan")
    images[:, :, 1::3, 1::2] = -0.0
    params = sample_hide_params(images.shape, {4: 1.0, 3: 1.0}, 0.5, generator(8))
    expected = loop_hide(images, params.sizes.tolist(), params.grid, torch.tensor([0.25, -0.0, 7.0]))
    for inplace in (False, True):
        out = hide(images.clone(), params, torch.tensor([0.25, -0.0, 7.0]), inplace=inplace)
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


def _hide_in_child(queue, images, params):
    queue.put(hide(images, params, torch.tensor([0.5, -1.0, 2.0])).tolist())  # plain data: no shared memory


def test_a_forked_child_hides_after_its_parent_used_the_cpu_kernel():
    """numba's OpenMP layer aborts a forked child that launches a parallel kernel (a DataLoader
    worker, a forked evaluator): there the torch path hides, with the same result."""
    import multiprocessing

    images = torch.randn(4, 3, 16, 16, generator=generator(9))
    params = sample_hide_params(images.shape, {4: 1.0}, 0.5, generator(10))
    expected = hide(images, params, torch.tensor([0.5, -1.0, 2.0]))  # the parent launches the kernel
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_hide_in_child, args=(queue, images, params))
    child.start()
    try:
        assert torch.equal(torch.tensor(queue.get(timeout=60)), expected)
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
