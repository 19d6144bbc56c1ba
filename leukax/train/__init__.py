"""Training: `ensemble` (deep-ensemble trainer, finetune / head modes), `optim` (optax optimizers with
injected hyper-parameters), `checkpoint` (Orbax), `features` (cached frozen-backbone features),
`bayes` (Bayesian optimisation of the GRU head)."""
