"""The EAGLE family: a draft head over the target's features, and what trains and stores it.

The front door: everything outside this folder (the registry, the adaptive speculator,
`train/`, `server/`) imports from here, never from the modules below.

- `proposer.py`: the `eagle` method (registered): the head drafts a dynamic token tree;
- `graft.py`: a lookup method's draft grafted onto that tree (`lookup` in the config);
- `head.py`: the head itself (`EagleConfig`, `EagleHead`), built for a target, and its
  drafting copy on the target's kernels (`with_kernels`);
- `checkpoint.py`: heads on disk, ours and the public EAGLE / EAGLE-3 layouts;
- `loss.py`: the training objective (soft labels, feature regression, training-time test),
  shared by `draftwise train eagle` and the adaptive speculator's online learner.
"""

from __future__ import annotations

from draftwise.speculators.eagle.checkpoint import load_eagle_head, save_eagle_head
from draftwise.speculators.eagle.head import (EagleConfig, EagleHead, config_for_target, default_eagle3_layers,
                                              init_head_from_target, with_kernels)
from draftwise.speculators.eagle.loss import Batch, EagleObjective, safe_point_in_backward
from draftwise.speculators.eagle.proposer import EagleProposer

__all__ = ["Batch", "EagleConfig", "EagleHead", "EagleObjective", "EagleProposer", "config_for_target",
           "default_eagle3_layers", "init_head_from_target", "load_eagle_head", "safe_point_in_backward",
           "save_eagle_head", "with_kernels"]
