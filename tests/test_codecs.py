import pytest
import torch

from pl_modules.codecs import ARCHITECTURES, build_codec, load_codec_weights, register, save_codec, split_parameters

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
