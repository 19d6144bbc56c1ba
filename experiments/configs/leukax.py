"""leukax's own recipe for Akter et al.'s hybrid CNN-GRU study (`experiments.hybrid_gru`'s defaults, written out):
what leukax changed, and why, relative to `akter2024`.

Command:   python -m experiments.hybrid_gru --config=leukax --weights_dir=../shared/weights
           python -m experiments.hybrid_gru --config=leukax --dataset=pbc --manual_dir=../shared/data/pbc-subset
Runtime:   the defaults' runs in experiments/hybrid_gru.py's docstring (e.g. PBC, 320 cells, 3 backbones × 5 folds,
           probe + GRU, M = 5: 8.4 min of training on 2 cores, results/heads/README.md).

Differences from the paper (`akter2024`), each a field below:
- each backbone at its own input size (224 / 299 / 260 px) instead of 224 for all;
- 8 dihedral views per cell drawn per member and epoch, test-time averaged (TTA), instead of 7 stored affine
  copies; no smoothing;
- standardisation + PCA to 256 channels fitted on the training part; the GRU reads the feature map with the
  cell's centre last (`order="center_last"`) — on PBC this turned a GRU that lost to the linear probe into one
  that beats it (results/heads/README.md);
- AdamW with warm-up + cosine, label smoothing 0.1, weight decay, input dropout, 128 GRU units;
- probe, linear and dense heads trained on the same features and splits as baselines;
- 5-fold cross-validation grouped by subject / duplicate (no cell in two parts).
"""
EXPERIMENT = "hybrid_gru"


def get_config() -> dict:
    return dict(
        dataset="cnmc2019", protocol="grouped_kfold", leaky=False, repeats=1, folds=5, val_fraction=0.2,
        image_size=0, smoothing="none", views="dihedral", num_affine=0, augment="views",
        backbones=("mobilenet_v2", "inception_v3", "efficientnet_b3"), b3_substitute="efficientnet_lite2",
        weights="imagenet", mode="head", heads=("probe", "linear", "dense", "gru"), head="gru",
        order="center_last", feature_dim=256, hidden=128, hparams="recipe",
        units=128, optimizer="adamw", learning_rate=3e-3, momentum=0.9, dropout=0.3, input_dropout=0.2,
        weight_decay=1e-2, label_smoothing=0.1, members=5, batch_size=32, epochs=40, patience=10,
        bo_trials=30, bo_batch=6, bo_members=1, bo_metric="val_nll",
        out_dir="results/hybrid_gru",
    )
