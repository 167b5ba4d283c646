"""Feature-space fidelity through real loading paths: torchvision weights from torch hub's cache,
CLIP through transformers' from_pretrained (tiny random models; their numbers mean nothing)."""
from pathlib import Path

import pytest
import torch
from torchvision.models import get_model, get_model_weights

from datamodules.images import list_images, load_rgb, to_tensor
from evaluation.evaluate import EvaluateConfig, run
from pl_modules.prior.tiny_models import save_tiny_clip
from pl_modules.scoring import features
from pl_modules.scoring.metrics import Unavailable


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def images(eval_dir):
    x = to_tensor(load_rgb(list_images(eval_dir)[0])[:128, :128].copy()).unsqueeze(0)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    return x, noisy


def cache_random_resnet18(hub: Path) -> None:
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(get_model("resnet18").state_dict(), hub / Path(get_model_weights("resnet18").DEFAULT.url).name)


@pytest.mark.unit
def test_task_backbone_without_cached_weights_is_unavailable(hub):
    with pytest.raises(Unavailable, match="needs weights resnet18-"):
        features.TorchvisionFidelity("torchvision:resnet18")
    measures, unavailable = features.build(["torchvision:resnet18"], "")
    assert measures == [] and "resnet18" in unavailable["torchvision:resnet18"]


@pytest.mark.unit
def test_task_fidelity_is_perfect_on_identical_images_and_drops_on_noise(hub, images):
    cache_random_resnet18(hub)
    fidelity = features.TorchvisionFidelity("torchvision:resnet18")
    x, noisy = images
    same, other = fidelity(x, x), fidelity(noisy, x)
    layers = [k for k in same if "/cos/" in k]
    assert {"task/resnet18/cos/layer1", "task/resnet18/cos/layer4"} <= set(layers)
    assert all(same[k] == pytest.approx(1.0, abs=1e-5) for k in layers) and same["task/resnet18/top1_agreement"] == 1.0
    assert other["task/resnet18/cos/layer1"] < 0.99


@pytest.mark.unit
def test_clip_similarity_and_iqa_through_from_pretrained(tiny_clip, images):
    clip = features.ClipFidelity(str(tiny_clip))
    x, noisy = images
    same, other = clip(x, x), clip(noisy, x)
    assert same["clip_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert other["clip_similarity"] < same["clip_similarity"]
    assert 0.0 <= other["clip_iqa"] <= 1.0


@pytest.mark.unit
def test_missing_clip_is_unavailable_not_downloaded(tmp_path):
    _, unavailable = features.build([], str(tmp_path / "no-clip-here"))
    assert "not available locally" in unavailable[str(tmp_path / "no-clip-here")]


@pytest.mark.stage
def test_evaluate_reports_feature_fidelity_per_method(hub, tiny_clip, trained_run, eval_dir, tmp_path):
    cache_random_resnet18(hub)
    _, final = trained_run
    curves = run(EvaluateConfig(images=str(eval_dir), models=[str(final)], classical=["webp"], metrics=["psnr"],
                                task_backbones=["torchvision:resnet18"], clip_model=str(tiny_clip),
                                out_dir=str(tmp_path / "out"), workers=1, max_images=1))
    for method in ("ours", "webp"):
        results = curves[method]["results"]
        assert {"clip_similarity", "clip_iqa", "task/resnet18/top1_agreement", "task/resnet18/cos/layer4"} <= set(results)
        assert all(0 <= v <= 1.0001 for v in results["clip_similarity"])


@pytest.mark.unit
def test_transformers_classifier_fidelity_through_from_pretrained(tmp_path, images):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=10)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    (fidelity,), unavailable = features.build([f"hf:{tmp_path / 'vit'}"], "")
    x, noisy = images
    same, other = fidelity(x, x), fidelity(noisy, x)
    assert unavailable == {} and same["task/vit/top1_agreement"] == 1.0
    assert same["task/vit/cos/hidden2"] == pytest.approx(1.0, abs=1e-5)
    assert other["task/vit/cos/hidden2"] < same["task/vit/cos/hidden2"]
    _, missing = features.build([f"hf:{tmp_path / 'nothing'}"], "")
    assert "not available locally" in missing[f"hf:{tmp_path / 'nothing'}"]
    with pytest.raises(ValueError, match="torchvision:<model name>"):
        features.build(["keras:resnet50"], "")


@pytest.mark.unit
def test_timm_fidelity_loads_a_weights_file_through_timm_and_reports_missing_ones(tmp_path, images):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("resnet18").state_dict(), str(tmp_path / "r18.safetensors"))
    (fidelity,), _ = features.build([f"timm:resnet18={tmp_path / 'r18.safetensors'}"], "")
    x, noisy = images
    same, other = fidelity(x, x), fidelity(noisy, x)
    assert same["task/resnet18/top1_agreement"] == 1.0 and same["task/resnet18/cos/stage4"] == pytest.approx(1.0)
    assert other["task/resnet18/cos/stage1"] < 0.99
    _, unavailable = features.build([f"timm:resnet18={tmp_path / 'none.safetensors'}"], "")
    assert "does not exist" in unavailable[f"timm:resnet18={tmp_path / 'none.safetensors'}"]


@pytest.mark.unit
def test_timm_without_cached_weights_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    _, unavailable = features.build(["timm:resnet18"], "")
    assert "in the HF cache" in unavailable["timm:resnet18"]
