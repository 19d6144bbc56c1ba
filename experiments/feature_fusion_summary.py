"""The table of every feature-fusion run under results/feature_fusion/, read from their metrics.json.

Command:   python -m experiments.feature_fusion_summary        (prints Markdown; results/feature_fusion/README.md
                                                                 holds its output between the RUNS markers)
"""
from __future__ import annotations

import json
import pathlib
import re
import sys

ROOT = pathlib.Path("results/feature_fusion")
START, END = "<!-- RUNS:START (python -m experiments.feature_fusion_summary) -->", "<!-- RUNS:END -->"


def _acc(m: dict, row: str) -> str:
    r = m["results"].get(row, {}).get("test_mean_std")
    if not r:
        return "–"
    a = r["accuracy"]
    return f"{100 * a['mean']:.1f} ± {100 * a['std']:.1f}"


def _auc(m: dict, row: str) -> str:
    r = m["results"][row]["test_mean_std"]
    key = "binary.roc_auc" if "binary.roc_auc" in r else "macro_roc_auc"
    return "–" if r[key]["mean"] is None else f"{r[key]['mean']:.3f}"


def table(root: pathlib.Path = ROOT) -> str:
    """Returns the Markdown table of every run (one row per results/feature_fusion/<run>/metrics.json)."""
    lines = ["| run | dataset (target) | protocol | enh. | branch input | branch 1 alone | branch 2 alone | "
             "meta, branch 1 | meta, branch 2 | **proposed** (AUC) | sum rule | time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(root.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        ds, b = m["dataset"], [x["requested"] for x in m["branches"]]
        used = " + ".join(x["used"] for x in m["branches"])
        prot = m["protocol"]["name"].split("(")[0].strip() + f", {m['protocol']['splits']} splits"
        lines.append(
            f"| [{path.parent.name}]({path.parent.name}/README.md) | {ds['name']} ({ds['target']}: "
            f"{', '.join(ds['classes'])}; {ds['n_images']} images) | {prot} | "
            f"{'on' if ds['enhancement'] != 'none' else 'off'} | {m['branch_input']} ({used}) | "
            f"{_acc(m, b[0])} | {_acc(m, b[1])} | {_acc(m, 'meta[branch 1]')} | {_acc(m, 'meta[branch 2]')} | "
            f"**{_acc(m, 'proposed')}** ({_auc(m, 'proposed')}) | {_acc(m, 'branch_sum_rule')} | "
            f"{m['timing_s']['total']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    text = table()
    readme = ROOT / "README.md"
    if "--write" in sys.argv and readme.exists():
        body = readme.read_text()
        body = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", body, flags=re.S)
        readme.write_text(body)
    print(text)


if __name__ == "__main__":
    main()
