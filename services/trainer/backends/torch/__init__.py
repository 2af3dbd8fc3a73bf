"""The CUDA worker's backend: torch + transformers + PEFT, every method through TRL's trainers
(`loop`, `methods`), checkpoints as safetensors + JSON through the Trainer's own resume
(`checkpoints`), what it offers on this machine (`capabilities`). It also runs on a CPU torch."""
