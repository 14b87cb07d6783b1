import pytest
import torch

from diffdistill.convnet import ConvNet
from diffdistill.uvit import count_parameters


def test_parameter_counts_match_the_challenge():
    assert count_parameters(ConvNet(3, 100, 32)) == 504_420           # CIFAR-100
    assert count_parameters(ConvNet(3, 200, 64)) == 1_938_120         # Tiny-ImageNet


def test_layers_are_conv_instancenorm_relu_avgpool():
    net = ConvNet(3, 10, 32)
    kinds = [type(m).__name__ for m in net.body]
    assert kinds == ["Conv2d", "GroupNorm", "ReLU", "AvgPool2d"] * 3
    gn = net.body[1]
    assert gn.num_groups == gn.num_channels == 128 and gn.affine


def test_forward_and_features_shapes():
    net = ConvNet(1, 10, 16, width=16)
    x = torch.randn(5, 1, 16, 16)
    assert net(x).shape == (5, 10)
    assert net.features(x).shape == (5, 16 * 2 * 2)
    net4 = ConvNet(3, 200, 64, depth=4, width=8)
    assert net4.features(torch.randn(2, 3, 64, 64)).shape == (2, 8 * 4 * 4)


@pytest.mark.parametrize("size,depth", [(28, 3), (30, 2), (48, 5)])
def test_sizes_that_do_not_halve_cleanly_are_refused(size, depth):
    with pytest.raises(ValueError, match="does not halve cleanly"):
        ConvNet(3, 10, size, depth=depth)
