"""Explainability: Grad-CAM and relatives for any timm backbone, faithfulness scores, pictures.

`visiontune.explain` is both this package and the API verb (`visiontune.explain(run, images)`).
"""

from visiontune._verb_package import make_callable

make_callable(__name__, "explain")
