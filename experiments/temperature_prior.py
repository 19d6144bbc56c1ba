"""Temperature scaling with a Gaussian prior on log T (`leukax.calibration.fit_temperature(prior_scale=σ)`),
swept over σ on a finished dev-suite run's saved predictions — no training (issue 20, calibration).

  python -m experiments.temperature_prior --run=results/dev_suite/three_backbones --prior_scales=0,0.25,0.5,1,2
  (writes <run>/temperature_prior.json and .md)

Per dataset, row (backbone or fused rule) and head: the pooled ECE after scaling (each split's T fitted on its
validation means, applied to its test means; `dev_suite.recompute_calibration`) and the smallest per-split T,
for every σ (0 = maximum likelihood, the default). The ECE-null band is the run's own (calibration.json).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from experiments import common, dev_suite
from experiments.common import field
from leukax import records


@dataclasses.dataclass
class Config:
    run: str = field("results/dev_suite/three_backbones", "A finished dev-suite run's folder.")
    prior_scales: tuple = field((0.0, 0.25, 0.5, 1.0, 2.0), "σ values (0 = maximum likelihood).")
    heads: tuple = field(("gru",), "Head kinds to report.")
    draws: int = field(200, "ECE-null draws (not reported here; the fit does not use them).")


def run(cfg: Config) -> dict:
    env = common.environment()
    folder = pathlib.Path(cfg.run)
    m = json.loads((folder / "metrics.json").read_text())
    table: dict = {}
    for sigma in map(float, cfg.prior_scales):
        cal = dev_suite.recompute_calibration(folder, m, draws=cfg.draws, prior_scale=sigma)
        for name, rows in cal.items():
            for row, heads in rows.items():
                for kind, c in heads.items():
                    if kind in cfg.heads:
                        table.setdefault(name, {}).setdefault(row, {}).setdefault(kind, {})[str(sigma)] = dict(
                            pooled_ece_scaled=round(c["pooled_ece_scaled"], 4),
                            min_temperature=round(min(r["temperature"] for r in c["per_split"]), 3))
    out = dict(command=common.command_line("experiments.temperature_prior", cfg), environment=env,
               peak_rss_mb=common.peak_rss_mb(), run=str(folder), run_command=m.get("command"), ece=table)
    records.write_json(folder / "temperature_prior.json", out)
    sig = [str(float(s)) for s in cfg.prior_scales]
    md = [f"`{out['command']}` (commit {env['commit']}): pooled ECE after temperature scaling, smallest per-split T "
          "in brackets, per prior scale σ (0 = maximum likelihood).", "",
          "| dataset | row | head | " + " | ".join(f"σ = {s}" for s in sig) + " |", "|---|---|---|" + "---|" * len(sig)]
    for name, rows in table.items():
        for row, heads in rows.items():
            for kind, v in heads.items():
                md.append(f"| {name} | {row} | {kind} | " + " | ".join(
                    f"{v[s]['pooled_ece_scaled']:.3f} ({v[s]['min_temperature']:.2f})" for s in sig) + " |")
    (folder / "temperature_prior.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return out


if __name__ == "__main__":
    common.main(Config, run)
