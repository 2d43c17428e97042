"""Cell tags of the finite element mesh: one source for the mesher (:mod:`qctfea.model.meshing`),
the materials step and the load cases (:mod:`qctfea.fea.loadcases`), which need no imaging
library to read them.
"""
TAG_BODY, TAG_POSTERIOR, TAG_SCREW = 1, 2, {"left": 3, "right": 4}
TAG_CAP = 5  #: end caps (PMMA), when the mask step found cap labels
BONE_TAGS = (TAG_BODY, TAG_POSTERIOR)
