"""Steps 3-7: dense features of each image, from which the masks are clustered.

``diffusion.py``: Stable Diffusion's UNet (the method); ``attention_maps.py``: the released
script's cross-attention-map features; ``vit.py``: a ViT's patch tokens (DINOv2, DINO, CLIP,
MAE) for the ablations.
"""
