"""The plan package: what to build, how it is edited, written and proposed.

* ``core``: the ``Plan`` schema, its validation (through the plan's method) and derived views;
* ``specs``: ``AdapterSpec`` and ``ExtendSpec``;
* ``edits``: every edit returns a new Plan;
* ``jsonio``: ``plan.json`` with format versions;
* ``donors``: the donor rules (nearest kept block, share-error row minima, suggested donor);
* ``proposals``: plans proposed from block scores, an analysis, or blocks to repeat.
"""
from __future__ import annotations

from flexigpt.methods import fold_layout
from flexigpt.plan.core import Plan
from flexigpt.plan.donors import (DONOR_METRICS, choose_donors, drop_with_suggestion, nearest_kept, suggested_donor,
                                  suggests_no_donor)
from flexigpt.plan.jsonio import FORMAT_VERSION, READABLE_VERSIONS
from flexigpt.plan.proposals import extend_plan, foldgpt_plan, plan_from_analysis, plan_from_scores
from flexigpt.plan.specs import AdapterSpec, ExtendSpec, NoteValue

__all__ = ["DONOR_METRICS", "FORMAT_VERSION", "READABLE_VERSIONS", "AdapterSpec", "ExtendSpec", "NoteValue", "Plan",
           "choose_donors", "drop_with_suggestion", "extend_plan", "fold_layout", "foldgpt_plan", "nearest_kept", "plan_from_analysis",
           "plan_from_scores", "suggested_donor", "suggests_no_donor"]
