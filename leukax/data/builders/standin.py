"""Open stand-ins for Himel et al.'s access-controlled 3-class composite, and a probe of the lab confound.

Himel et al. 2024 build ALL / AML / healthy from ALL-IDB2 (ALL, healthy) and the ASH image bank (AML), so
every AML image comes from another source than every ALL or healthy image. The open stand-in keeps that
structure with images that may be redistributed (``shared/data``):

- `all_aml_healthy_standin`: ALL = C-NMC 2019 `all`, AML = AML-Cytomorphology_LMU `MYO` (myeloblasts),
  healthy = C-NMC 2019 `hem`; class names as in `all_aml_healthy` ("ALL", "AML", "healthy"). `source` says
  the lab (cnmc2019 | aml_lmu), so the *source* is exactly "AML or not": a model may learn the lab.
- `lab_probe`: normal lymphoid cells of both labs, C-NMC `hem` (label 0, "cnmc_hem") against AML-LMU `LYT`
  (label 1, "lmu_lyt"). The cell type is (nearly) the same, so what separates them is the lab (stain,
  scanner, background, segmentation): how well a classifier does here measures the confound.

Folders: under `manual_dir`, `aml-lmu-sample/` (or `aml_lmu/`, `AML-Cytomorphology_LMU/`) with
``<CLASS>___<CLASS>_NNNN_NNN.tiff`` files (flat or in class folders), and the C-NMC images from
`cnmc2019-sample/` (or `cnmc2019/`) when present, else the 60-cell sample embedded in leukax. C-NMC keeps
its subjects as groups; AML-LMU file names carry no patient, so each of its images is its own group.
"""
from __future__ import annotations

import pathlib
import re

from leukax.data.builders.base import LeukaxBuilder, Record, list_images
from leukax.data.builders.datasets import cnmc_records, find_manual, sample_dir

AML_LMU_DOI = "doi:10.7937/tcia.2019.36f5o9ld (https://doi.org/10.7937/tcia.2019.36f5o9ld)"
_LMU_RE = re.compile(r"^([A-Z]{3})_{1,3}(?:[A-Z]{3}_)?\d+(?:_\d+)?\.tiff?$")
_CNMC_ALIASES = ("cnmc2019-sample", "cnmc2019", "C-NMC_Leukemia")


def aml_lmu_records(root: pathlib.Path, cell: str, label: int, prefix: str = "aml_lmu/") -> list[Record]:
    """Returns the AML-LMU images of one cell class (e.g. "MYO", "LYT") as records with source aml_lmu."""
    folder = find_manual(root, ("aml-lmu-sample", "aml_lmu", "AML-Cytomorphology_LMU"), "aml_lmu",
                         "AML-Cytomorphology_LMU single-cell TIFFs (<CLASS>___<CLASS>_NNNN_NNN.tiff)",
                         f"The Cancer Imaging Archive, {AML_LMU_DOI}", "the TIFF files (flat or per class)",
                         allow_root=False)
    out = []
    for p in list_images(folder):
        m = _LMU_RE.match(p.name)
        klass = m.group(1) if m else p.parent.name
        if klass == cell:
            out.append(Record(p, label, prefix + str(p.relative_to(folder)), source="aml_lmu"))
    if not out:
        raise FileNotFoundError(f"aml_lmu: no {cell} images in {folder}")
    return out


def cnmc_sample_records(root: pathlib.Path, prefix: str = "cnmc2019/") -> list[Record]:
    """Returns C-NMC records (label 1 = all, 0 = hem) from root/<alias> or else the embedded sample."""
    folder = next((root / a for a in _CNMC_ALIASES if (root / a).is_dir()), sample_dir())
    recs = cnmc_records(folder, prefix=prefix)
    for r in recs:
        r.source = "cnmc2019"
    return recs


class AllAmlHealthyStandin(LeukaxBuilder, skip_registration=True):
    name = "all_aml_healthy_standin"
    CLASS_NAMES = ("ALL", "AML", "healthy")
    DESCRIPTION = ("Open stand-in for Himel et al.'s composite: C-NMC all (ALL), AML-LMU MYO (AML), C-NMC hem "
                   "(healthy). AML comes from another lab than ALL and healthy: `source` records it.")
    CITATION = ("Gupta A., Gupta R. (2019) doi:10.7937/tcia.2019.dc64i46r; Matek C. et al. (2019) "
                "doi:10.7937/tcia.2019.36f5o9ld")

    def _records(self):
        cnmc = cnmc_sample_records(self._manual_root)
        for r in cnmc:
            r.label = 0 if r.label == 1 else 2   # all -> ALL (0), hem -> healthy (2)
        return cnmc + aml_lmu_records(self._manual_root, "MYO", 1)


class LabProbe(LeukaxBuilder, skip_registration=True):
    name = "lab_probe"
    CLASS_NAMES = ("cnmc_hem", "lmu_lyt")
    DESCRIPTION = ("Normal lymphoid cells from two labs: C-NMC hem (0) vs AML-LMU LYT (1); a classifier that "
                   "separates them has learned the lab, not the cell.")
    CITATION = AllAmlHealthyStandin.CITATION

    def _records(self):
        hem = [r for r in cnmc_sample_records(self._manual_root) if r.label == 0]
        return hem + aml_lmu_records(self._manual_root, "LYT", 1)


BUILDERS = {b.name: b for b in (AllAmlHealthyStandin, LabProbe)}
