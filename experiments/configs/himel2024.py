"""Himel et al. 2024 (IEEE Access): the two-stage feature-fusion stacked ensemble. Configures
`experiments.feature_fusion`.

Command:   python -m experiments.feature_fusion --config=himel2024 --weights_dir=../shared/weights
           python -m experiments.feature_fusion --config=himel2024 --dataset=all_aml_healthy --manual_dir=<ALL-IDB2 + ASH>
           python -m experiments.feature_fusion --config=himel2024 --protocol=grouped_kfold --repeats=2
               (the same method under leukax's grouped cross-validation)
Runtime:   the embedded sample, paper protocol (60 cells × 16 copies), one split: see results/REPRODUCTION.md.

What it reproduces, and where the paper says so:
- Sec. III-B (pre-processing): each image expanded into rotated (0/90/180/270°) and flipped copies, then
  +30 brightness, ×1.4 contrast and the [[0,-1,0],[-1,5,-1],[0,-1,0]] Laplacian sharpening (`enhance`); 224 px.
- Fig. 2 / Sec. III-C: per branch, an ImageNet backbone kept frozen, Dense(1024, ReLU) → Dropout(0.3) →
  Dense(K, softmax) (`features=1024`, `dropout=0.3`); branches EfficientNetB7 and MobileNetV3Large.
- Sec. III-C.3: the branches' output layers dropped, their 1024-d features concatenated and fed to the
  meta-classifier Dense(1000, sigmoid) → Dense(100, ReLU) → Dense(10, sigmoid) → softmax
  (`leukax.fusion.MetaClassifier`).
- Table 1: batch 32, 100 epochs, Adam, early stopping patience 50, categorical cross-entropy, 70/10/20 split.
- Sec. IV (Table 3's 1248 test images = 0.2 · 16 · 390): the copies are made before a per-image split, so
  copies of one cell sit in training and test (`protocol="paper"`, `expand=16`); one split (`repeats=1`).
- Table 2: the other base models with the same head (`baselines`).

Left open by the paper, and chosen here:
- the learning rate: not given; 1e-3 (Keras' Adam default);
- the seed count: one model (`members=1`);
- where the Dense(1024) reads: Table 3's counts put it on the 1000-way ImageNet output; that classifier's weights
  exist offline only for EfficientNet-Lite, so the branches read the pooled features (`branch_input="pooled"`);
  `--branch_input=imagenet_logits` is the paper's position where the weights exist;
- EfficientNetB7 and MobileNetV3Large ImageNet weights cannot be obtained offline here: EfficientNet-Lite2 and
  MobileNetV2 (Coral's quantisation-aware-trained copy, dequantised) run in their place (`branch_fallbacks`),
  and the rows of every table are named after the network that ran.
"""
EXPERIMENT = "feature_fusion"


def get_config() -> dict:
    return dict(
        dataset="cnmc2019",                 # --dataset=all_aml_healthy --manual_dir=<ALL-IDB2 + ASH> for the paper's
        protocol="paper", expand=16, repeats=1, val_fraction=0.2, folds=5,
        image_size=224, enhance=True,
        branches=("efficientnet_b7", "mobilenet_v3_large"),
        branch_fallbacks=("efficientnet_lite2", "mobilenet_v2"),
        branch_input="pooled", weights="imagenet",
        features=1024, dropout=0.3, members=1,
        learning_rate=1e-3, batch_size=32, epochs=100, patience=50,
        out_dir="results/feature_fusion/himel2024",
    )
