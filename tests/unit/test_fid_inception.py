"""The FID Inception port against an independent one (torch-fidelity 0.4.0) on the same random weights.

torch-fidelity is a dev dependency installed with `pip install --no-deps torch-fidelity==0.4.0`.
Its package `__init__` imports torchvision, which this project never imports, so the test loads
only its torch-only Inception module, under an empty stand-in for the package.
"""

import importlib
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from tests.fidutil import calibrated_inception_state
from tsvae_dist.fid.inception import FEATURE_DIM, InceptionNet, extract_features, fp32_precision, resize_bilinear_tf1

LAYERS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
          "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
          "Mixed_7a", "Mixed_7b", "Mixed_7c"]


@pytest.fixture(scope="module")
def fidelity():
    """torch-fidelity's Inception and TF1-resize modules, imported without the package `__init__`."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("torch-fidelity is missing: it is a dev dependency, "
                    "install it with `pip install --no-deps torch-fidelity==0.4.0`")
    names = ["torch_fidelity", "torch_fidelity.version", "torch_fidelity.feature_extractor_inceptionv3",
             "torch_fidelity.interpolate_compat_tensorflow", "torch_fidelity.feature_extractor_base",
             "torch_fidelity.helpers", "torch_fidelity.defaults", "torch_fidelity.deprecations"]
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    try:
        version = importlib.import_module("torch_fidelity.version").__version__
        inception = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        interpolate = importlib.import_module("torch_fidelity.interpolate_compat_tensorflow")
    finally:  # leave sys.modules as it was; the imported modules stay usable through these references
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    assert version == "0.4.0", f"expected torch-fidelity 0.4.0, found {version}"
    assert "torchvision" not in sys.modules
    return types.SimpleNamespace(inception=inception, interpolate=interpolate)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(calibrated_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def ours(weights_file):
    net = InceptionNet()
    net.load_state_dict(torch.load(weights_file, weights_only=True), strict=True)
    return net.eval()


def _theirs(fidelity, weights_file, dtype: str = "float32"):
    return fidelity.inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_file),
        feature_extractor_internal_dtype=dtype)


def _images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _record(net: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [getattr(net, name).register_forward_hook(
        lambda _m, _i, out, name=name: outputs.__setitem__(name, out.detach().clone())) for name in LAYERS]
    return outputs, handles


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_state_dict_layout_matches_reference_port(fidelity, ours, weights_file):
    theirs = _theirs(fidelity, weights_file).state_dict()
    mine = ours.state_dict()
    assert len(mine) == 566
    assert sum(p.numel() for p in ours.parameters()) == 23_850_960
    assert list(mine) == list(theirs)
    assert all(mine[k].shape == theirs[k].shape for k in mine)


def test_features_match_reference_port_layer_by_layer(fidelity, ours, weights_file):
    theirs = _theirs(fidelity, weights_file)
    images = _images((2, 3, 45, 61), seed=1)
    mine_out, mine_handles = _record(ours)
    their_out, their_handles = _record(theirs)
    with torch.no_grad():
        features = ours(images)
        (reference,) = theirs(images)
    for handle in mine_handles + their_handles:
        handle.remove()

    for name in LAYERS:
        assert mine_out[name].shape == their_out[name].shape, name
        assert _rel_err(mine_out[name], their_out[name]) < 1e-5, name
    assert features.shape == (2, FEATURE_DIM) and features.dtype == torch.float32
    assert _rel_err(features, reference) < 1e-5
    # The random network must not be degenerate, or the comparison above would prove little.
    assert (features > 0).float().mean() > 0.5
    assert _rel_err(features[0], features[1]) > 1e-2


def test_float64_features_match_reference_port(fidelity, ours, weights_file):
    theirs = _theirs(fidelity, weights_file, "float64")
    images = _images((1, 3, 32, 32), seed=2)
    net64 = InceptionNet()
    net64.load_state_dict(ours.state_dict())
    with torch.no_grad():
        features = net64.double().eval()(images)
        (reference,) = theirs(images)  # computed in float64, returned as float32
    assert features.dtype == torch.float64
    assert _rel_err(features, reference) < 1e-6


def test_grayscale_is_replicated_to_rgb(ours):
    gray = _images((1, 1, 40, 40), seed=3)
    assert torch.equal(extract_features(ours, gray), extract_features(ours, gray.expand(-1, 3, -1, -1)))


def test_float_input_in_uint8_range_equals_uint8_input(ours):
    images = _images((1, 3, 299, 299), seed=4)
    assert torch.equal(extract_features(ours, images), extract_features(ours, images.float()))


def test_rejects_wrong_channel_count(ours):
    with pytest.raises(ValueError, match="1 or 3 channels"):
        ours(torch.zeros(1, 4, 8, 8))


def test_tf1_resize_hand_computed():
    # TF1 (align_corners=False) samples src = dst * in/out: 2 -> 3 gives src 0, 2/3, 4/3 (clamped).
    x = torch.tensor([[[[0.0, 30.0], [60.0, 90.0]]]])
    expected = torch.tensor([[[[0.0, 20.0, 30.0], [40.0, 60.0, 70.0], [60.0, 80.0, 90.0]]]])
    torch.testing.assert_close(resize_bilinear_tf1(x, 3, 3), expected, rtol=0, atol=1e-5)
    # Downsampling 4 -> 2 takes src 0 and 2 exactly; a half-pixel resize would give 0.5 and 2.5.
    row = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]]]])
    torch.testing.assert_close(resize_bilinear_tf1(row, 1, 2), torch.tensor([[[[0.0, 2.0]]]]), rtol=0, atol=0)
    assert not torch.allclose(F.interpolate(row, size=(1, 2), mode="bilinear", align_corners=False),
                              torch.tensor([[[[0.0, 2.0]]]]))


@pytest.mark.parametrize("size", [(32, 32), (45, 61), (64, 64), (350, 420), (299, 299), (598, 26)])
def test_tf1_resize_matches_reference_port(fidelity, size):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(5)) * 255
    resize = fidelity.interpolate.interpolate_bilinear_2d_like_tensorflow1x
    reference = resize(x, size=(299, 299), align_corners=False)
    torch.testing.assert_close(resize_bilinear_tf1(x, 299, 299), reference, rtol=1e-6, atol=1e-4)


def test_fp32_precision_disables_tf32_and_restores():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32)
    try:
        for setting in [(True, True), (False, True), (True, False)]:
            cudnn.allow_tf32, matmul.allow_tf32 = setting
            with fp32_precision():
                assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
            assert (cudnn.allow_tf32, matmul.allow_tf32) == setting
        cudnn.allow_tf32, matmul.allow_tf32 = True, True
        with pytest.raises(KeyError), fp32_precision():  # restored on the way out of an exception too
            raise KeyError
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before
