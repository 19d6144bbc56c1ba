"""Training: `ensemble` (deep-ensemble trainer, finetune / head modes: `EnsembleState`, pure `init`,
`train_epoch`, `evaluate`, `early_stopping_update`, and the `fit` loop), `members` (one member's step and the
vmap / lax.map / sequential ensemble axes), `optim` (optax optimizers with injected hyper-parameters),
`checkpoint` (Orbax, with fallback past unreadable steps), `features` (cached frozen-backbone features),
`bayes` (resumable Bayesian optimisation of the GRU head)."""
