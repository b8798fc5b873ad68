"""Pixel maths on frames: blends and their rounding, colour correction, resizing, masks, inpainting geometry, the difference-mask method, contact sheets."""
