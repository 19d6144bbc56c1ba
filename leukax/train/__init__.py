"""Training: `compiled` (head mode: the whole early-stopped run of M heads on cached features, and of T trials, as
one jit-compiled program), `finetune` (backbone + head end to end: `EnsembleState`, pure `init`, `train_epoch`,
`evaluate`, `early_stopping_update`, the member axis, and the `fit` loop with Orbax checkpoints), `optim` (the one
optimizer factory and early-stopping rule of both), `checkpoint` (Orbax, with fallback past unreadable steps),
`features` (cached frozen-backbone features), `views`, `recipe`, `probe`, `bayes` (batched Bayesian
optimisation of the head-mode recipe)."""
