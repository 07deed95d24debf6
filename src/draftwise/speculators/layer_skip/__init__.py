"""The `layer_skip` method: the target drafts for itself with its first L layers.

- `proposer.py`: the method (registered), drafting chains through the target's own layers;
- `calibration.py`: how L is chosen when the config does not give it (measured early-exit
  acceptance against the cost of L layers).

Everything outside this folder imports from here.
"""

from __future__ import annotations

from draftwise.speculators.layer_skip.calibration import calibrate, candidate_layers, pick_num_layers
from draftwise.speculators.layer_skip.proposer import LayerSkipProposer

__all__ = ["LayerSkipProposer", "calibrate", "candidate_layers", "pick_num_layers"]
