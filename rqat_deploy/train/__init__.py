"""Training: recipes, stage 1 (block-wise calibration), GPTQ, stage 2 (end-to-end scale training),
losses, the teacher and data parallelism."""
