"""The challenge's evaluation ConvNet (the "ConvNet" of Dataset Condensation / DC-benchmark).

depth × [Conv2d 3×3 (padding 1, bias), GroupNorm(width, width, affine) — i.e. instance norm with a
learned scale and shift per channel —, ReLU, AvgPool2d 2×2], flatten, one Linear to the classes.

Depth 3 at 32×32×3 with 100 classes has 504,420 parameters; at 64×64×3 with 200 classes 1,938,120
(the two numbers the ECCV 2024 challenge's evaluator gives). Depth 4 is an option for 64 px.
"""
from torch import nn


class ConvNet(nn.Module):
    def __init__(self, in_channels, num_classes, image_size, depth=3, width=128):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("image_size", image_size), ("depth", depth), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ConvNet: {name} must be a positive integer, got {value!r}.")
        # Every block halves the side; an odd side would silently drop a row/column in AvgPool,
        # so the image must be divisible by 2**depth.
        if image_size % (2 ** depth) != 0:
            raise ValueError(
                f"ConvNet: image_size {image_size} does not halve cleanly {depth} times (it must be "
                f"divisible by 2**depth = {2 ** depth}); resize the images or choose a smaller depth.")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.image_size, self.depth, self.width = image_size, depth, width

        layers, channels = [], in_channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.GroupNorm(width, width, affine=True),   # one group per channel = instance norm
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            channels = width
        self.body = nn.Sequential(*layers)
        side = image_size // (2 ** depth)
        self.feature_dim = width * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x):
        """Flattened penultimate features [N, width·(image_size/2**depth)²] (FID-with-ConvNet, k-center)."""
        return self.body(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.features(x))
