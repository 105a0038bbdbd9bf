r"""Decoder-only byte-level language model on the embedded Shakespeare corpus.

Launch (the main job, `make run`):
    python -m deepscale_jax.main --config=configs/lm.py --workdir=runs/lm
Presets and overrides:
    python -m deepscale_jax.main --config=configs/lm.py:smoke --workdir=/tmp/lm_smoke
    python -m deepscale_jax.main --config=configs/lm.py:deep,layers=96 --workdir=runs/lm_deep
    python -m deepscale_jax.main --config=configs/lm.py --config.model.norm=rms_norm ...

Presets:
- smoke:   2 layers, d=32, a few steps; seconds on a laptop CPU (tests use it).
- default: 24 layers, d=64, Pre-LN, Xavier, scanned; 800 steps of 16 x 128 bytes, about 6
           minutes on 2 CPU cores; reaches about 3.1 validation bits/byte (a uniform byte model
           scores 8.0).
- deep:    192 layers, d=128, scanned with full remat; the depth this project is about.
"""

from __future__ import annotations

from configs import common

PRESETS = {
    "smoke": {
        "model.num_layers": 2,
        "model.d_model": 32,
        "model.num_heads": 2,
        "model.d_ff": 64,
        "model.max_len": 64,
        "train.num_steps": 6,
        "train.batch_size": 8,
        "train.seq_len": 32,
        "train.log_every_steps": 2,
        "train.eval_every_steps": 3,
        "train.eval_batches": 2,
        "optim.warmup_steps": 2,
        "ckpt.every_steps": 3,
    },
    "default": {
        "model.num_layers": 24,
        "model.d_model": 64,
        "model.num_heads": 2,
        "model.d_ff": 256,
        "model.max_len": 128,
        "train.num_steps": 800,
        "train.batch_size": 16,
        "train.seq_len": 128,
        "train.log_every_steps": 20,
        "train.eval_every_steps": 200,
        "train.eval_batches": 16,
        "optim.learning_rate": 3e-3,
        "optim.warmup_steps": 60,
        "ckpt.every_steps": 100,
    },
    "deep": {
        "model.num_layers": 192,
        "model.d_model": 128,
        "model.num_heads": 4,
        "model.d_ff": 512,
        "model.max_len": 128,
        "model.remat_policy": "full",
        "scheme.name": "default",
        "train.num_steps": 2000,
        "train.batch_size": 16,
        "train.seq_len": 128,
        "train.eval_every_steps": 500,
        "optim.learning_rate": 5e-4,
        "optim.warmup_steps": 200,
        "ckpt.every_steps": 250,
    },
}


def get_config(arg: str | None = None):
    """The LM config for `arg` = "[preset][,key=value...]" (preset defaults to "default")."""
    return common.build(common.base_config("lm"), PRESETS, arg)
