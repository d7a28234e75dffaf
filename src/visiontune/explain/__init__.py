"""Explainability: Grad-CAM and relatives for any timm backbone, faithfulness scores, pictures."""
