"""Specification of the run config: defaults, strict keys and types, overrides, readable errors."""
import pytest

from trainers.config import ConfigError, RunConfig, config_differences, load_config


def test_defaults_round_trip_through_a_plain_dict():
    config = RunConfig()
    assert RunConfig.from_dict(config.to_dict()) == config
    assert config.has.mixture == "none" and not config.has.enabled


@pytest.mark.parametrize("data, message", [
    ({"optim": {"lrr": 0.1}}, "optim.lrr: unknown key; did you mean optim.lr? allowed keys here: name, lr,"),
    ({"optimizer": {}}, "optimizer: unknown key; did you mean optim?"),
    ({"optim": {"lr": "fast"}}, "optim.lr: 'fast' is not allowed; allowed: a number"),
    ({"optim": {"epochs": 2.5}}, "optim.epochs: 2.5 is not allowed; allowed: an int"),
    ({"optim": {"name": "rmsprop"}}, "optim.name: 'rmsprop' is not allowed; allowed: one of 'sgd', 'adamw'"),
    ({"optim": {"lr": -1}}, "optim.lr: -1.0 is not allowed; a number > 0"),
    ({"model": {"backbone": "vgg19"}}, "model.backbone: 'vgg19' is not allowed; allowed: tiny_cnn, alexnet_gap,"),
    ({"has": {"fill": "pink"}}, "has.fill: 'pink' is not allowed; allowed: dataset_mean, zero,"),
    ({"has": {"p_hide": 2}}, "has.p_hide: 2.0 is not allowed; a probability in [0, 1]"),
    ({"has": {"mixture": {16: -1}}}, "has.mixture: weight -1 of size 16 is not allowed"),
    ({"has": {"mixture": 100}}, "has.mixture: patch size 100 is larger than the input 48x48"),
    ({"eval": {"iou_thresholds": 0.5}}, "eval.iou_thresholds: 0.5 is not allowed; allowed: a list of a number"),
    ({"data": {"name": "CUB"}}, "data.root: required for the folder dataset 'CUB'"),
    ({"channels_last": "yes"}, "channels_last: 'yes' is not allowed; allowed: true/false"),
    ({"device": "tpu"}, "device: 'tpu' is not allowed; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'"),
])
def test_bad_values_name_the_dotted_key_the_value_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict(data)
    assert str(error.value).startswith(message)


def test_mixtures_are_stored_in_their_readable_canonical_form():
    assert RunConfig.from_dict({"has": {"mixture": {16: 1, 8: 1}}}).has.mixture == "mixed:8,16"
    assert RunConfig.from_dict({"has": {"mixture": 8}}).has.mixture == "8"
    assert RunConfig.from_dict({"has": {"mixture": "mixed:0,8,16"}}).has.sizes == {0: 1.0, 8: 1.0, 16: 1.0}


def test_overrides_are_typed_dotted_assignments():
    config = RunConfig.from_dict({"optim": {"lr": 0.1}}, ["optim.lr=0.05", "has.mixture=8",
                                                           "data.synthetic.train_size=100", "eval.iou_thresholds=[0.5]"])
    assert config.optim.lr == 0.05 and config.has.mixture == "8"
    assert config.data.synthetic.train_size == 100 and config.eval.iou_thresholds == (0.5,)
    with pytest.raises(ConfigError, match="optim.lrr: unknown key; did you mean optim.lr?"):
        RunConfig.from_dict({}, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="override 'optim.lr' is not dotted.key=value"):
        RunConfig.from_dict({}, ["optim.lr"])


def test_config_files_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{missing}: no such config file"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{broken}: not valid YAML"):
        load_config(broken)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optim:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=f"{wrong}: optim.lr: 'abc' is not allowed"):
        load_config(wrong)
    good = tmp_path / "good.yaml"
    good.write_text("optim:\n  lr: 0.2\nhas:\n  mixture: mixed:0,8,16\n")
    assert load_config(good, ["seed=3"]).optim.lr == 0.2 and load_config(good, ["seed=3"]).seed == 3


def test_differences_ignore_runtime_keys():
    a = RunConfig()
    b = RunConfig.from_dict({}, ["optim.lr=0.5", "device=cpu", "data.workers=7", "has.mixture=8"])
    assert config_differences(a, b) == {"has.mixture": ("none", "8"), "optim.lr": (0.2, 0.5)}


def test_exponent_numbers_in_yaml_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-5 as a string; a learning rate written that way must still be a number.
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-5\n  weight_decay: 5e-4\n")
    config = load_config(path, ["optim.momentum=9e-1"])
    assert (config.optim.lr, config.optim.weight_decay, config.optim.momentum) == (1e-5, 5e-4, 0.9)


def test_off_and_on_are_words_not_booleans(tmp_path):
    # YAML 1.1 reads off/on/yes/no as booleans: `amp: off` would become False and be refused.
    path = tmp_path / "run.yaml"
    path.write_text("amp: off\nchannels_last: false\n")
    assert load_config(path).amp == "off" and load_config(path).channels_last is False
    assert RunConfig.from_dict({}, ["amp=off", "compile=true"]).amp == "off"
    with pytest.raises(ConfigError, match="channels_last: 'yes' is not allowed"):
        RunConfig.from_dict({}, ["channels_last=yes"])


MULTISTEP = {"schedule": "multistep", "epochs": 55}


@pytest.mark.parametrize("optim, message", [
    ({"milestones": [18]}, "optim.milestones: [18] is only for schedule 'multistep' (schedule is 'cosine'); "
                           "allowed here: []"),
    ({"schedule": "step", "weight_decay_factors": [1, 0]},
     "optim.weight_decay_factors: [1.0, 0.0] is only for schedule 'multistep' (schedule is 'step'); allowed here: []"),
    (MULTISTEP, "optim.milestones: [] is not allowed with schedule 'multistep'; a list of epochs where the next "
                "stage starts, e.g. [30, 60]"),
    ({**MULTISTEP, "milestones": [29, 18]}, "optim.milestones: [29, 18] is not allowed; increasing epochs in 1..54 "
                                            "(0-based epoch where the next stage starts; epochs is 55)"),
    ({**MULTISTEP, "milestones": [18, 55]}, "optim.milestones: [18, 55] is not allowed; increasing epochs in 1..54"),
    ({**MULTISTEP, "milestones": [0, 18]}, "optim.milestones: [0, 18] is not allowed; increasing epochs in 1..54"),
    ({**MULTISTEP, "milestones": [18, 29], "lr_factors": [1, 0.5]},
     "optim.lr_factors: [1.0, 0.5] is not allowed; one factor per stage: 3 for 2 milestones (or [] for the default)"),
    ({**MULTISTEP, "milestones": [18], "lr_factors": [1, 0]},
     "optim.lr_factors: [1.0, 0.0] is not allowed; factors > 0"),
    ({**MULTISTEP, "milestones": [18], "weight_decay_factors": [1, -1]},
     "optim.weight_decay_factors: [1.0, -1.0] is not allowed; factors >= 0"),
    ({**MULTISTEP, "milestones": 18}, "optim.milestones: 18 is not allowed; allowed: a list of an int"),
])
def test_multistep_stages_are_checked_where_they_are_declared(optim, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"optim": optim})
    assert str(error.value).startswith(message)


def test_the_has_authors_schedule_is_a_valid_multistep_config():
    # kkanshul/Hide-and-Seek train.lua: five stages over 55 epochs; weight decay 0 from the 30th epoch on.
    optim = RunConfig.from_dict({"optim": {**MULTISTEP, "lr": 0.01, "milestones": [18, 29, 43, 52],
                                           "lr_factors": [1, 0.5, 0.1, 0.05, 0.01],
                                           "weight_decay_factors": [1, 1, 0, 0, 0]}}).optim
    assert optim.milestones == (18, 29, 43, 52) and optim.lr_factors == (1.0, 0.5, 0.1, 0.05, 0.01)
    assert RunConfig.from_dict(RunConfig(optim=optim).to_dict()).optim == optim


def test_train_resize_mode_is_square_or_shorter_side():
    assert RunConfig().data.resize == "square"
    assert RunConfig.from_dict({}, ["data.resize=shorter_side"]).data.resize == "shorter_side"
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"data": {"resize": "longer_side"}})
    assert str(error.value) == "data.resize: 'longer_side' is not allowed; allowed: one of 'square', 'shorter_side'"


def test_large_feature_map_defaults_off_and_is_for_wsolevaluations_backbones_only():
    assert RunConfig().model.large_feature_map is False  # wsolevaluation's default (config.py 204-205)
    for backbone in ("vgg16_gap", "resnet50_cam", "inception_v3_cam"):
        assert RunConfig.from_dict({"model": {"backbone": backbone, "large_feature_map": True}}).model.large_feature_map
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"model": {"backbone": "alexnet_gap", "large_feature_map": True}})
    assert str(error.value) == ("model.large_feature_map: true is not allowed with backbone 'alexnet_gap'; "
                                "allowed with: vgg16_gap, resnet50_cam, inception_v3_cam (or false)")


def test_the_fast_group_multiplier_replaces_new_layer_lr_mult():
    assert RunConfig.from_dict({"model": {"fast_lr_mult": 10}}).model.fast_lr_mult == 10
    with pytest.raises(ConfigError, match="model.new_layer_lr_mult: unknown key; did you mean model.fast_lr_mult?"):
        RunConfig.from_dict({"model": {"new_layer_lr_mult": 10}})
    with pytest.raises(ConfigError, match="model.fast_lr_mult: 0.0 must be > 0"):
        RunConfig.from_dict({"model": {"fast_lr_mult": 0}})
