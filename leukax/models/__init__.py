"""Flax backbones and heads; networks only, no file reading (that is `leukax.weights`).

- `registry`: backbone names, input sizes, normalisation (`get_spec`, `get_backbone`, `names`);
- one module per family: `mobilenet_v2`, `mobilenet_v3`, `inception_v3`, `efficientnet` (B0–B7, Lite0–4),
  `resnet_v2`, `xception`; shared `layers` (depthwise and pointwise convolutions fast on XLA:CPU);
- `heads` (`GRUHead`, `DenseHead`, `LinearHead`, `make_head`, the papers' head hyper-parameters) and
  `classifier.Classifier(backbone, head)`.

A backbone with ImageNet weights: `leukax.pretrained.pretrained(name, weights="imagenet")`.
"""
