"""The `contrastive` family: CLIP and SigLIP dual encoders (docs/contrastive.md)."""
