import pytest
import torch

from pl_modules.core.codecs import (ARCHITECTURES, CodecConfig, as_decoded, build_codec, load_codec_weights, register,
                                    round_straight_through, save_codec, split_parameters)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_parameter_split_is_a_partition_with_quantiles_alone_in_aux(name):
    model = build_codec(name, 16, 24)
    net, aux = split_parameters(model)
    assert {id(p) for p in net}.isdisjoint({id(p) for p in aux})
    assert len(net) + len(aux) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".quantiles") for p in aux)
    assert not any(names[id(p)].endswith(".quantiles") for p in net)


def test_split_refuses_a_model_without_an_entropy_bottleneck():
    with pytest.raises(AssertionError, match="quantiles"):
        split_parameters(torch.nn.Linear(2, 2))


def test_registry_refuses_a_duplicate_name():
    with pytest.raises(KeyError, match="already registered"):
        register("bmshj2018-hyperprior")(lambda N, M: None)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(KeyError, match="bmshj2018-factorized"):
        build_codec("bmshj2099", 8, 8)


def test_weights_round_trip_and_a_foreign_file_fails_naming_keys(tmp_path):
    model = build_codec("bmshj2018-hyperprior", 16, 24)
    path = tmp_path / "codec.safetensors"
    save_codec(model, path)
    twin = load_codec_weights(build_codec("bmshj2018-hyperprior", 16, 24), path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key
    with pytest.raises(ValueError, match=r"shape mismatches \[h_s"):
        load_codec_weights(build_codec("mbt2018-mean", 16, 24), path)
    with pytest.raises(ValueError, match=r"missing keys \[.*context_prediction"):
        load_codec_weights(build_codec("mbt2018", 16, 24), path)


@pytest.mark.parametrize("name", ["bmshj2018-hyperprior", "mbt2018-mean"])
def test_straight_through_rounding_feeds_the_synthesis_the_decoded_latent_and_keeps_noisy_rates(name):
    torch.manual_seed(0)
    codec = build_codec(name, 16, 24).train()
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(1)
    noisy = codec(x)
    handle = round_straight_through(codec)
    torch.manual_seed(1)
    out = codec(x)
    # z's rate is untouched: the same noise, the same likelihoods; y's is still noisy, not rounded.
    assert torch.equal(out["likelihoods"]["z"], noisy["likelihoods"]["z"])
    with torch.no_grad():
        decoded = codec.eval()(x)  # what decompress reconstructs: both latents rounded
    codec.train()
    assert not torch.allclose(out["likelihoods"]["y"], decoded["likelihoods"]["y"], atol=1e-4)
    assert torch.allclose(out["x_hat"], decoded["x_hat"], atol=1e-5)
    assert not torch.allclose(noisy["x_hat"], decoded["x_hat"], atol=1e-3)
    out["x_hat"].square().mean().backward()  # distortion alone still reaches the analysis
    assert codec.g_a[0].weight.grad.abs().sum() > 0
    handle.remove()
    torch.manual_seed(1)
    assert torch.equal(codec(x)["x_hat"], noisy["x_hat"])


def test_straight_through_on_y_alone_leaves_the_hyperprior_on_noise_as_compressai_trains_it():
    torch.manual_seed(0)
    codec = build_codec("bmshj2018-hyperprior", 16, 24).train()
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(1)
    noisy = codec(x)
    with round_straight_through(codec, hyper_latent=False):
        torch.manual_seed(1)
        out = codec(x)
    # Scales from the noisy z, as without the hook: both rates unchanged; the synthesis reads round(y).
    assert torch.equal(out["likelihoods"]["y"], noisy["likelihoods"]["y"])
    assert torch.equal(out["likelihoods"]["z"], noisy["likelihoods"]["z"])
    with torch.no_grad():
        decoded = codec.eval()(x)
    assert torch.allclose(out["x_hat"], decoded["x_hat"], atol=1e-5)


def test_as_decoded_holds_the_files_values_and_passes_gradients_straight_through():
    x = torch.tensor([-0.2, 0.1234, 0.5, 1.3], requires_grad=True)
    out = as_decoded(x)
    assert torch.equal(out.detach(), torch.tensor([0.0, 31 / 255, 128 / 255, 1.0]))
    assert torch.equal(as_decoded(x, eight_bit=False).detach(), torch.tensor([0.0, 0.1234, 0.5, 1.0]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


def test_straight_through_refuses_models_that_quantise_before_their_context_model():
    with pytest.raises(ValueError, match="straight-through rounding needs a hyperprior"):
        round_straight_through(build_codec("mbt2018", 16, 24))


def test_fast_training_settings_change_speed_not_the_model():
    from foundation.config import load_config
    from pl_modules.core.codec_module import CodecModule, CodecModuleConfig

    def module(*overrides):
        torch.manual_seed(0)
        return CodecModule(load_config(CodecModuleConfig, overrides=["codec.N=16", "codec.M=24", *overrides]))

    plain, fast = module(), module("channels_last=true", "compile=true")
    assert list(fast.state_dict()) == list(plain.state_dict())  # the compiled step is no submodule
    x = {"image": torch.rand(2, 3, 64, 64)}
    terms = []
    for m in (plain, fast):  # compiled and channels-last
        torch.manual_seed(1)
        terms.append(m.losses(x)[0]["loss"])
    # Close, not equal: the quantisation noise fills a channels-last tensor in its memory order.
    assert torch.allclose(terms[0], terms[1], rtol=1e-3)
    with pytest.raises(Exception, match="straight_through: mbt2018 quantises before its context model"):
        load_config(CodecModuleConfig, overrides=["codec.architecture=mbt2018", "straight_through=true"])


@pytest.mark.parametrize("name", ["bmshj2018-hyperprior", "latent-mean-hyperprior"])
def test_the_traceable_entropy_bottleneck_is_compressais_forward_in_one_graph(name):
    import torch._dynamo
    from compressai.entropy_models import EntropyBottleneck

    codec = build_codec(name, 16, 24).train()
    bottleneck = codec.entropy_bottleneck
    z = torch.randn(2, 16, 5, 3) * 4
    for training in (True, False):
        torch.manual_seed(0)
        ours = bottleneck(z, training)
        torch.manual_seed(0)
        theirs = EntropyBottleneck.forward(bottleneck, z, training)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
    x = torch.rand(1, codec.in_channels, 64, 64)
    # CompressAI's own forward splits this into 7 graphs (its permutation is a tensor).
    assert torch._dynamo.explain(lambda x: codec(x)["x_hat"])(x).graph_count == 1


def test_the_latent_codec_round_trips_a_latent_unclamped_with_minimal_padding():
    from pl_modules.core.bitstream import pad_to_multiple

    torch.manual_seed(0)
    codec = build_codec("latent-mean-hyperprior", 16, 24).eval()
    codec.update(force=True)
    latent = 3 * torch.randn(1, 4, 20, 28)  # a 160×224 image's SD latent; latents are not in [0, 1]
    padded = pad_to_multiple(latent, codec.pad_multiple)
    assert padded.shape[-2:] == (24, 32)  # to 8 latent pixels (64 image pixels), not 64 (512)
    out = codec.compress(padded)
    assert tuple(out["shape"]) == (24 // codec.latent_stride, 32 // codec.latent_stride)
    decoded = codec.decompress(out["strings"], out["shape"])["x_hat"]
    with torch.no_grad():
        forward = codec(padded)["x_hat"]  # eval mode rounds as the decoder does
    assert torch.allclose(decoded, forward, atol=1e-4)
    assert decoded.min() < 0  # not clamped to an image's range
    assert codec.decompress(out["strings"], out["shape"])["x_hat"].equal(decoded)  # deterministic


def test_pixel_stages_refuse_the_latent_codec_in_one_line():
    from pl_modules.core.codec_module import CodecModuleConfig

    with pytest.raises(ValueError, match="codec.architecture: latent-mean-hyperprior codes 4-channel diffusion "
                                         "latents, not images; stage 1 needs a pixel codec"):
        CodecModuleConfig(codec=CodecConfig(architecture="latent-mean-hyperprior"))
