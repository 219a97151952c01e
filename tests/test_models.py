"""Every preset builds, runs forward and backward, and has the sizes it claims."""

import pytest
import torch

from cae.config.trial import ModelConfig, TrialConfig
from cae.model.network import PRESETS, build_model, count_params, describe, get_preset, plan


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_forward_backward_and_sizes(name):
    cfg = get_preset(name)
    model = build_model(cfg)
    x = torch.rand(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    z = model.encode(x)
    out = model.decode(z)
    assert out.shape == (3, cfg.out_channels, cfg.image_size, cfg.image_size)
    assert z[0].numel() == plan(cfg).latent_size == describe(cfg)["latent_size"]
    loss = out.pow(2).mean() + model.penalty(z)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert count_params(model) == describe(cfg)["params"]


@pytest.mark.parametrize(
    "name, width, kernel, padding, channels, latent",
    [
        ("study_a_default", 8, 3, 1, 16, 1024),
        ("study_a_fewer_layers", 16, 3, 1, 12, 3072),
        ("study_a_more_channels", 8, 3, 1, 128, 8192),
        ("study_a_larger_filters", 8, 5, 1, 16, 576),
    ],
)
def test_study_a_latent_table(name, width, kernel, padding, channels, latent):
    cfg = get_preset(name)
    p = plan(cfg)
    assert p.stage_out[-1] == width  # W entering the latent conv
    assert channels * ((width - kernel + 2 * padding) // 1 + 1) ** 2 == latent
    assert p.latent_size == latent
    side = (width - kernel + 2 * padding) + 1
    z = build_model(cfg).encode(torch.rand(1, 3, 32, 32))
    assert z.shape == (1, channels, side, side)


def test_study_a_colorize_has_42338_params():
    model = build_model(get_preset("study_a_colorize"))
    assert count_params(model) == 42_338
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2, 32, 32)


def test_study_b_model12_counts():
    model = build_model(get_preset("study_b_model12"))
    assert count_params(model) == 107_877
    running = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
    assert running == 130
    assert model.encode(torch.rand(2, 1, 28, 28)).shape == (2, 8)
    convs = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(convs) == 8  # 4 + 3 mirrored convs and the output conv


def test_stochastic_dropout_rates_are_drawn_per_layer_and_seeded():
    cfg = get_preset("study_b_model12").model_copy(update={"dropout": 0.2, "dropout_std": 0.05})
    a, b = build_model(cfg, seed=1), build_model(cfg, seed=1)
    assert a.dropout_rates == b.dropout_rates and len(a.dropout_rates) == 2
    assert a.dropout_rates[0] != a.dropout_rates[1]
    assert build_model(cfg, seed=2).dropout_rates != a.dropout_rates


def test_he_uniform_bounds():
    model = build_model(get_preset("study_b_model12"))
    conv = model.encoder[0]
    bound = (6 / (conv.in_channels * 9)) ** 0.5
    assert conv.weight.abs().max() <= bound and conv.bias.abs().max() == 0


def test_penalties_add_to_loss():
    cfg = get_preset("dense_tiny").model_copy(update={"activity_l1": 1e-3, "edge_l2": 1e-3})
    model = build_model(cfg)
    z = model.encode(torch.rand(4, 1, 28, 28))
    assert model.penalty(z) > 0
    assert build_model(get_preset("dense_tiny")).penalty(z) == 0


def _trial(**model):
    return {"data": {"dataset": "sample"}, "model": model}


@pytest.mark.parametrize(
    "model, needle",
    [
        ({"channels": [8], "kernell": 3}, "kernell"),
        ({"bottleneck": "dense", "latent_dim": 0}, "latent_dim"),
        ({"channels": [8], "kernel": 31, "padding": 0}, "kernel 31 is larger than its input"),
        ({"channels": [8, 8, 8, 8, 8, 8]}, "pools a 1x1 map"),
        ({"channels": [8, 8], "convs": [1, 2, 3]}, "convs has 3 entries"),
        ({"channels": [64], "pool": False, "bottleneck": "conv"}, "larger than the input"),
        ({"channels": [8], "kernel": 4}, "odd"),
    ],
)
def test_impossible_models_are_refused(model, needle):
    with pytest.raises(ValueError) as info:
        TrialConfig.model_validate(_trial(**model))
    assert needle in str(info.value)


def test_colorize_needs_rgb():
    with pytest.raises(ValueError, match="colorize.*RGB"):
        TrialConfig.model_validate({"data": {"dataset": "mnist"}, "task": {"name": "colorize"}})


def test_trial_fills_shapes_from_dataset_and_task():
    t = TrialConfig.model_validate(
        {"data": {"dataset": "cifar10"}, "task": {"name": "colorize"},
         "model": {"preset": "study_a_colorize"}}
    )
    assert (t.model.in_channels, t.model.out_channels, t.model.image_size) == (1, 2, 32)
    with pytest.raises(ValueError, match="model.in_channels is 3"):
        TrialConfig.model_validate({"data": {"dataset": "sample"},
                                    "model": {"preset": "study_a_default"}})


def test_preset_overrides():
    cfg = ModelConfig.model_validate({"preset": "study_b_model12", "latent_dim": 4})
    assert cfg.latent_dim == 4 and cfg.dense == [49, 40, 30, 20, 10]
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.model_validate({"preset": "nope"})


def test_decoder_dense_dropout_is_placed_by_position():
    """A dense stack whose width equals the reshape size (4 x 7 x 7 = 196) still gets its
    dropout after every decoder dense layer but the one feeding the reshape."""
    from cae.model.plan import Dropout, Linear, layers

    cfg = ModelConfig.model_validate(
        {"in_channels": 1, "out_channels": 1, "image_size": 28, "channels": [8, 4],
         "bottleneck": "dense", "dense": [64, 196], "latent_dim": 8, "dense_dropout": 0.5})
    _, dec = layers(cfg)
    dense = [i for i, layer in enumerate(dec) if isinstance(layer, Linear)]
    assert [dec[i].fout for i in dense] == [196, 64, 196]
    followed = [any(isinstance(x, Dropout) for x in dec[i + 1:i + 3]) for i in dense]
    assert followed == [True, True, False]
    model = build_model(cfg)
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.decoder) == 2


def test_every_layer_kind_builds_and_an_unknown_one_is_refused():
    from cae.model.network import CAE

    model = build_model(get_preset("study_b_model12"))
    with pytest.raises(TypeError, match="no module for layer"):
        CAE._module(model, ("conv", 1, 2, 3, 1, 1))


def test_layers_are_remembered_per_architecture_and_never_shared():
    """The dry run asks each architecture's layers many times: the remembered answer must
    follow every field of the config (and the seed), and a caller's list is its own."""
    from cae.model import plan as arch

    shape = {"in_channels": 1, "out_channels": 1, "image_size": 28}
    a = ModelConfig(channels=[8, 16], latent_dim=8, **shape)
    enc, dec = arch.layers(a)
    enc.clear()
    assert arch.layers(a)[0], "a caller emptied the remembered encoder"
    b = ModelConfig(channels=[8, 16], latent_dim=9, **shape)
    assert arch.param_count(b) != arch.param_count(a)
    assert arch.param_count(b) == count_params(build_model(b))
    a.latent_dim = 16  # the same object changed after a first call
    assert arch.param_count(a) == count_params(build_model(ModelConfig(channels=[8, 16], **shape,
                                                                       latent_dim=16)))
