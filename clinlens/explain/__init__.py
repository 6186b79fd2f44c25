"""Explanation heatmaps for CLIP: Grad-ECLIP on the real multi-head last block and MedGrad entropy weighting."""
