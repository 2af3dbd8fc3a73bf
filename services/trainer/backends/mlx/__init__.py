"""The MLX backend: mlx-lm-lora's building blocks in a loop of tunebus's own (`loop`), its
methods (`methods`), what it offers (`capabilities`). Checkpoints are written by the loop."""
