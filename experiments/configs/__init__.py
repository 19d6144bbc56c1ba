"""Named configurations (big_vision style): one module per method, `get_config()` → field values of one
experiment's Config, `EXPERIMENT` = that experiment. Run as `python -m experiments.<EXPERIMENT> --config=<name>`;
flags given on the command line override single fields (`experiments.common.apply_named_config`)."""
