"""The reproduction grid's definition, shared by the runner and the report: the initialisations,
the sources and where each run lives."""

from __future__ import annotations

import os

from timm_jax.experiments.protocol import INITS  # noqa: F401  (the paper's rows, defined once)

ALL_HCP = {"All-HCP 1:14": "hcp_1_14", "All-HCP 1:7": "hcp_1_7", "All-HCP 8:14": "hcp_8_14"}
ALL_HCP_FRACTION = 0.08
#: ``--variants``: T-IMM with one FuseConfig setting changed (beyond the paper), at this fraction
VARIANTS = {
    "T-IMM entropy": {"adaption_objective": "entropy"},
    "T-IMM Adam Fisher": {"fisher": "adam"},
    "T-IMM channel": {"granularity": "channel"},
}
VARIANT_FRACTION = 0.08
#: source run name -> (task of the demo manifest, source it starts from)
SOURCES = {
    "m1": ("task1", ""),
    "m2": ("task2", "m1"),
    "hcp_1_14": ("hcp_1_14", ""),
    "hcp_1_7": ("hcp_1_7", ""),
    "hcp_8_14": ("hcp_8_14", ""),
}


def slug(init: str) -> str:
    return init.lower().replace(" ", "_").replace(":", "_").replace("-", "")


def cell_dir(out: str, fraction: float, seed: int) -> str:
    return os.path.join(out, "runs", f"f{round(fraction * 100):03d}", f"seed{seed}")
