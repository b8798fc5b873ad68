"""The executor: img2img jobs (one frame's sampling state machine, seeded noise) and the rounds that batch every ready job into engine calls."""
