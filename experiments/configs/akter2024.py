"""Akter et al. 2024 (arXiv 2410.14536): the hybrid CNN-GRU deep ensembles fused by the sum rule, as the paper
describes them, without leukax's additions. Configures `experiments.hybrid_gru`.

Command:   python -m experiments.hybrid_gru --config=akter2024 --weights_dir=../shared/weights
           python -m experiments.hybrid_gru --config=akter2024 --dataset=all_idb2 --manual_dir=<folder with ALL-IDB>
           python -m experiments.hybrid_gru --config=akter2024 --protocol=grouped_kfold --noleaky --repeats=5
               (the same method under leukax's grouped, repeated cross-validation)
           python -m experiments.hybrid_gru --config=akter2024 --mode=finetune   (backbone trained too)
Runtime:   (2 CPU cores, measured) the default command on the embedded C-NMC sample (60 cells, one paper split, three
           hybrids, features cached, --heads=probe,gru --nosave_model): 6 min 43 s, peak RSS 2.39 GB
           (results/hybrid_gru/akter2024); with --protocol=grouped_kfold --noleaky --repeats=1 (5 folds): 37 min beside
           a test run, 2.57 GB (results/hybrid_gru/akter2024_grouped).
           --protocol=paper_80_20 --repeats=5 on a 260-cell-sized set (the 320-cell PBC subset, 1664 stored training
           items per split), features cached, MobileNetV2 hybrid alone: 45 min 12 s, 1.75 GB, 35.5 s per epoch,
           one line per epoch (results/benchmarks/akter2024_pbc_timing.md); the three hybrids ≈ 95 min or more. That
           is the paper's arithmetic at ~90 % of the CPU's float32 matmul rate (results/benchmarks/gru_arithmetic.md);
           the issue's "< 5 min on 2 cores" is not reachable without departing from the paper (or on a GPU).

What it reproduces, and where the paper says so:
- Sec. 3.2 (pre-processing): noise-removal smoothing of every image (`smoothing`), the seven Keras
  ImageDataGenerator transforms of Sec. 3.2.1 (rotation 45°, shifts 20 %, zoom 10 %, both flips, shear 20°:
  `leukax.augment.augment_paper1`), 224 × 224 inputs for every backbone (Sec. 3.2.2, Sec. 3.5).
- Tables 3, 6, 7: the test sets are un-augmented (22 / 52 / 74 = 20 % of 108 / 260 / 368 images) and the
  training sets hold about 8 times the training images (689 ≈ 8·86, 1664 = 8·208, 2353 ≈ 8·294): the data were
  split 80/20 first and only the training part was augmented, as 7 stored copies besides each original. Here:
  `num_affine=7` views + the original (`views="none"`), stored as training items (`augment="copies"`), validation
  and test read the original only.
- Sec. 4.3: 80 % training / 20 % test, 20 % of the training part for validation (64/16/20), split per image
  (`protocol="paper_80_20"`, `leaky=True`); one split (`repeats=1`).
- Sec. 3.5 / Fig. 4: the backbone's last feature map flattened position by position and read by a GRU
  (`order="raster"`, no PCA: `feature_dim=0`), then two dense layers, softmax.
- Table 2 per backbone (`hparams="paper"`, `leukax.train.recipe.PAPER_TABLE2`): InceptionV3 512 units, SGD,
  lr 0.01, momentum 0.3, dropout 0.4; MobileNetV2 512, SGD, 0.01, 0.9, 0.1; EfficientNetB3 256, RMSprop, 1e-4,
  0.5, 0.1; constant learning rate, no label smoothing, no weight decay. `--hparams=bo` searches
  `leukax.train.bayes.RECIPE_SPACE` (units 128/256/512, SGD/RMSprop/AdamW, lr 1e-5…10^-1.5, momentum 0…0.99,
  dropout 0…0.6, plus input dropout and weight decay), which contains every Table 2 point; the paper gives
  neither its search space nor its number of trials.
- Sec. 3.6 / 3.7.1: a deep ensemble of M members per hybrid, the three hybrids' scores summed (sum rule).
- Backbones MobileNetV2, InceptionV3, EfficientNetB3; EfficientNetB3's ImageNet weights cannot be obtained
  offline here, so EfficientNet-Lite2 runs in its place (`b3_substitute`), named so in every table, and every
  metrics.json records each backbone's weights file and how it differs from the paper's (`hybrids`).

Left open by the paper, and chosen here:
- frozen or trained backbone: not stated; `mode="head"` (frozen, features cached); `--mode=finetune` trains the
  backbone with the GRU head under the same Table 2 row (its augmentation is drawn per batch, not stored);
- the smoothing filter: "noise reduction" only; a Gaussian with sigma 1 (`smoothing="gaussian"`);
- M, epochs, batch size, early stopping, the two dense layers' width: not given; M = 5, ≤ 40 epochs with
  patience 10 on validation NLL (best weights kept), batch 32 (Keras' default), Dense(128, relu) → Dense(K);
- where the validation part comes from (before or after augmenting): taken before, un-augmented.
- The paper's own inconsistencies: Sec. 3.5 gives InceptionV3-GRU a 1024-neuron GRU layer, Table 2 512 units
  (Table 2 used); at 224 px MobileNetV2 ends in 7×7×1280 and InceptionV3 in 5×5×2048 maps, while Sec. 3.5 gives
  (5,5)/1536 for MobileNetV2 and (7,7)/512 for InceptionV3 (the maps read here are the networks' own).
"""
EXPERIMENT = "hybrid_gru"


def get_config() -> dict:
    return dict(
        # data and protocol (Sec. 4.3; Tables 3, 6, 7)
        dataset="cnmc2019",                 # embedded sample; --dataset=all_idb1|all_idb2|all_idb --manual_dir=...
        protocol="paper_80_20", leaky=True, repeats=1, val_fraction=0.2, folds=5,
        # pre-processing and augmentation (Sec. 3.2)
        image_size=224, smoothing="gaussian",
        views="none", num_affine=7, augment="copies",
        # hybrids (Sec. 3.5, Table 2)
        backbones=("mobilenet_v2", "inception_v3", "efficientnet_b3"), b3_substitute="efficientnet_lite2",
        weights="imagenet", mode="head", heads=("gru",), head="gru",
        order="raster", feature_dim=0, hidden=128,
        hparams="paper",
        # leukax's recipe fields, set to the paper's (Table 2 overrides units/optimizer/lr/momentum/dropout)
        units=512, optimizer="sgd", learning_rate=0.01, momentum=0.9, dropout=0.1,
        input_dropout=0.0, weight_decay=0.0, label_smoothing=0.0,
        members=5, batch_size=32, epochs=40, patience=10,
        bo_trials=30, bo_batch=6, bo_members=1, bo_metric="val_acc",
        out_dir="results/hybrid_gru/akter2024",
        progress=True,
    )
