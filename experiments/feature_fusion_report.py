"""Test time, figures and the per-run README.md of experiments/feature_fusion.py (Himel et al. 2024)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments import feature_fusion_parts as fp
from leukax import fusion, plots
from leukax.models.classifier import count_params


def _label(models, name) -> str:
    rec = models[name].get("record") or {}
    used = rec.get("used", name)
    return name if used == name else f"{used} (for {name})"


def timing(cfg, models, branch_names, first, k, test_images) -> dict:
    """Returns measured test time (ms per step of 32 and per image, best of 3 after a compile) and the
    parameters of every runnable model as run here (trainable = the head; the backbone [+ ImageNet top]
    frozen), and of the proposed two-stage model."""
    rows, fwd = {}, {}
    for n, m in models.items():
        if "inputs" not in m:
            continue
        model, variables = fp.branch_classifier(m, first["heads"][n], k, cfg.features, cfg.branch_input)
        fwd[n] = fp.branch_forward(m, model, variables)
        c = count_params(variables)
        head = sum(np.size(x) for name, sub in variables["params"]["head"].items() if name != "imagenet_top"
                   for x in jax.tree_util.tree_leaves(sub))
        rows[_label(models, n)] = dict(total=c["total"], trainable=int(head), non_trainable=c["total"] - int(head),
                                       **fp.ms_per_step(lambda x, f=fwd[n]: f(x)[0], test_images))
    meta = fusion.MetaClassifier(k)
    b1, b2 = (fwd[b] for b in branch_names)

    @jax.jit
    def proposed(x):
        feats = jnp.concatenate([b1(x)[1], b2(x)[1]], -1)
        return jax.nn.softmax(meta.apply(first["meta"], feats)[0])

    n_meta = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(first["meta"])))
    branch_rows = [rows[_label(models, b)] for b in branch_names]
    out_dense = 2 * (cfg.features * k + k)   # the branches' output Dense layers, dropped in the fused model
    total = sum(r["total"] for r in branch_rows) - out_dense + n_meta
    trainable = sum(r["trainable"] for r in branch_rows) - out_dense + n_meta
    rows["proposed (two branches + meta-classifier)"] = dict(
        total=total, trainable=trainable, non_trainable=total - trainable, **fp.ms_per_step(proposed, test_images))
    return dict(rows=rows, how=f"batch of 32 at {cfg.image_size} px (test images tiled), best of 3 timed calls "
                               f"after one compiling call, {jax.devices()[0]}")


def figures(cfg, fig_dir, models, branch_names, first, labels, pooled, mask, names, items, results=None) -> None:
    """Himel et al. Figs. 1, 4-7 and 10 (and training curves), class names on every figure. items: the study's
    `feature_fusion_parts.Items` (the few pictured images are decoded from it; raw and enhanced for Fig. 1
    when enhanced); results: the per-model summaries (Fig. 4)."""
    y = labels[mask]
    b1, b2 = (_label(models, b) for b in branch_names)
    plots.confusion_matrix(y, pooled["proposed"][mask], names, title="Two-stage fused model",
                           path=fig_dir / "confusion_matrix_proposed.png")
    for b, lab in zip(branch_names, (b1, b2)):
        plots.confusion_matrix(y, pooled[b][mask], names, title=f"{lab} alone", path=fig_dir / f"confusion_matrix_{b}.png")
    comp = {"proposed (fused)": pooled["proposed"][mask]}
    comp.update({_label(models, n): pooled[n][mask] for n, m in models.items() if "inputs" in m})
    plots.model_comparison_curves(y, comp, names, title="Test parts of the first repeat, pooled",
                                  path=fig_dir / "roc_pr_models.png")
    plots.roc_curves(y, pooled["proposed"][mask], names, path=fig_dir / "roc_per_class_proposed.png")
    plots.pr_curves(y, pooled["proposed"][mask], names, path=fig_dir / "pr_per_class_proposed.png")
    hist = {(_label(models, n) if n in models else n): {key: v[0] for key, v in h.items()}
            for n, h in first["hist"].items() if n in branch_names or n.startswith("proposed")}
    plots.training_curves(hist, path=fig_dir / "training_curves_first_split.png")
    test = np.asarray(first["split"].test)
    pick = fp.pick_per_class(labels, list(test), cfg.gradcam_per_class)
    images = items.images(pick)
    heat, probs = {}, {}
    for b, lab in zip(branch_names, (b1, b2)):
        model, variables = fp.branch_classifier(models[b], first["heads"][b], len(names), cfg.features,
                                                cfg.branch_input)
        heat[lab], probs[lab] = fp.branch_gradcam(models[b], model, variables, images)
    plots.gradcam_branches(images, heat, labels[pick], probs, names,
                           title="Grad-CAM of each branch (first split's test images)",
                           path=fig_dir / "gradcam_branches.png")
    if cfg.enhance:
        plots.image_pairs(items.images(pick, enhanced=False), images, labels[pick], names,
                          path=fig_dir / "enhancement.png")
    if results is not None:
        keys = ("accuracy", "weighted_precision", "weighted_recall", "weighted_f1")
        bars = {_label(models, n) if n in models else n: [(results[n]["test_mean_std"][q]["mean"] or 0.0,
                                                             results[n]["test_mean_std"][q]["std"] or 0.0) for q in keys]
                for n in [*[m for m in models if "inputs" in models[m]], "proposed"]}
        plots.metric_bars(bars, keys, title=f"Each model on {', '.join(names)}", path=fig_dir / "metrics_bars.png")


def _ms(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def _load(result: dict) -> str:
    """'; 1-min load average 3.1 at the start, 2.4 at the end' (what else ran), or '' when not recorded."""
    la = result.get("load_average_1min")
    return "" if not la else f"; 1-min load average {la['start']:.1f} at the start, {la['end']:.1f} at the end"


def readme(result: dict) -> str:
    """Returns the run's README.md: provenance, Tables 2/8/5/3, test time, figures (paper's numbers labelled)."""
    env, ds, pr, res = result["environment"], result["dataset"], result["protocol"], result["results"]
    subs = [f"{b['requested']} → {b['used']}" for b in result["branches"] if b.get("substitution")]
    lines = [f"# {result['study']} — {ds['name']}" + (f", target = {ds['target']}" if ds["target"] != "class" else ""),
             "", f"Command: `{result['command']}`", "",
             f"Commit `{env['commit']}`, device {env['device']} ({env['cpu_count']} cores{_load(result)}), "
             f"{result['timing_s']['total']:.0f} s in total"
             + (f", peak RSS {result['peak_rss_mb'] / 1024:.2f} GB." if result.get("peak_rss_mb") else "."), "",
             f"Dataset: {ds['name']}, classes {ds['classes']}, {ds['n_images']} images ({ds['counts']}), sources "
             f"{ds['sources']}, {ds['groups']} groups, {ds['image_size']} px, enhancement {ds['enhancement']}; "
             f"{ds['n_items']} items after {ds['expand']} offline copies.", "",
             f"Protocol: {pr['name']}, {pr['splits']} split(s); {pr['training']}. Branch input: "
             f"`{result['branch_input']}`. Substitutions (no offline ImageNet weights): {', '.join(subs) or 'none'}.",
             "", "All numbers: mean ± std over splits, in %. **Paper's** numbers are Himel et al.'s (3-class "
             "ALL-IDB2 + ASH composite, their leaky protocol), for reference only: another dataset.", "",
             "## Table 2: each backbone alone (same head, same protocol)", ""]
    t2 = {}
    for n in fp.TABLE2:
        row = res.get(n)
        if n == "nasnet_large":
            t2["nasnet_large (not implemented in leukax)"] = {"paper_key": n}
        elif row is None:
            continue
        elif "error" in row:
            t2[f"{n} (not runnable offline: no ImageNet weights here)"] = {"paper_key": n}
        else:
            used = result["baselines"][n].get("used", n)
            t2[n if used == n else f"{used} (for {n})"] = dict(row, paper_key=n)
    t2["proposed (two branches, meta-classifier)"] = dict(res["proposed"], paper_key="proposed")
    lines += fp.markdown_rows(t2, fp.PAPER_TABLE2)
    lines += ["", "## Table 8: one branch vs two (the meta-classifier on each)", ""]
    t8 = {"meta on branch 1 only": dict(res["meta[branch 1]"], paper_key="single branch 1"),
          "meta on branch 2 only": dict(res["meta[branch 2]"], paper_key="single branch 2"),
          "both branches (proposed)": dict(res["proposed"], paper_key="dual branch"),
          "sum rule of the two branches' softmax (not in the paper)": res["branch_sum_rule"]}
    lines += fp.markdown_rows(t8, fp.PAPER_TABLE8, keys=("accuracy", "weighted_precision", "weighted_recall",
                                                          "weighted_f1"))
    lines += ["", "## Table 5: per class (precision / recall / F1, %)", "",
              "| class | model | precision | recall | F1 | paper's (P, R, F1) |", "|---|---|---|---|---|---|"]
    shown = {b["requested"]: b["used"] + (f" (for {b['requested']})" if b["used"] != b["requested"] else "")
             for b in result["branches"]}
    for c in ds["classes"]:
        for key in (*shown, "proposed"):
            st = res[key]["per_class_mean_std"]
            cells = [fp._fmt(st[f"per_class.{c}.{m}"]) for m in ("precision", "recall", "f1")]
            paper = fp.PAPER_TABLE5.get(c, {}).get(key, "–")
            lines.append(f"| {c} | {shown.get(key, key)} | " + " | ".join(cells) + f" | {paper} |")
    lines += ["", "## Table 3: parameters as the paper counts them (frozen backbone + ImageNet top + head)", "",
              f"Computed from leukax's modules (shapes only, no weights needed) for K = {len(ds['classes'])} with the "
              "head on the 1000 ImageNet outputs, as in the paper; `trainable` is the head. As configured "
              f"(`{result['branch_input']}`) the counts are in metrics.json `table3_as_configured`.", "",
              "| model | total | trainable | non-trainable | paper's total (K = 3) |", "|---|---|---|---|---|"]
    for r in result["table3_paper_semantics"]:
        paper = fp.PAPER_TABLE3_TOTALS.get(r["model"])
        lines.append(f"| {r['model']} | {r['total']:,} | {r['trainable']:,} | {r['non_trainable']:,} | "
                     f"{'–' if paper is None else f'{paper:,}'} |")
    lines += ["", f"## Test time, as run here ({result['test_time']['how']})", "",
              "| model | total params | trainable | ms / step of 32 | ms / image | paper's ms / step (P100) |",
              "|---|---|---|---|---|---|"]
    for name, r in result["test_time"]["rows"].items():
        key = "proposed" if name.startswith("proposed") else name.split("(for ")[-1].rstrip(")")
        lines.append(f"| {name} | {r['total']:,} | {r['trainable']:,} | {_ms(r['ms_per_step'])} | "
                     f"{_ms(r['ms_per_image'])} | {fp.PAPER_TABLE3_MS_PER_STEP.get(key, '–')} |")
    lines += ["", "## Figures", "",
              "- `figures/confusion_matrix_proposed.png`, `figures/confusion_matrix_<branch>.png` (Fig. 7)",
              "- `figures/roc_pr_models.png`: macro ROC and PR of every model (Figs. 5, 6)",
              "- `figures/roc_per_class_proposed.png`, `figures/pr_per_class_proposed.png`: per class",
              "- `figures/training_curves_first_split.png`: both branches' heads and the meta-classifier",
              "- `figures/gradcam_branches.png`: Grad-CAM of each branch (Fig. 10)",
              "- `figures/metrics_bars.png`: accuracy and weighted P / R / F1 of every model (Fig. 4)",
              "- `figures/enhancement.png`: the Grad-CAM images raw and enhanced (Fig. 1; only with --enhance)", ""]
    return "\n".join(lines)
