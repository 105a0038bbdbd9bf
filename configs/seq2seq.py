r"""Encoder-decoder Transformer on German number words -> English number words (data/numbers.py:
"einundzwanzig" -> "twenty-one"; numbers 0..999999 split by number, test numbers unseen).

Launch:
    python -m deepscale_jax.main --config=configs/seq2seq.py --workdir=runs/seq2seq
    python -m deepscale_jax.main --config=configs/seq2seq.py:smoke --workdir=/tmp/s2s_smoke
    python -m deepscale_jax.main --config=configs/seq2seq.py:dsinit_matt_12l --workdir=runs/s2s12

Training as Vaswani et al. 2017 (sec. 5.3-5.4): Adam(0.9, 0.98, 1e-9) without weight decay,
linear warmup then inverse-square-root decay, label smoothing 0.1; byte vocabulary shared by
source and target (+ PAD, BOS, EOS), tied softmax, sinusoidal positions, token embeddings
times sqrt(d_model) (sec. 3.4; without it the unit-amplitude sinusoids drown the Xavier-sized
token embeddings, std ~0.07, and a 800-step run learned an LM that ignored the source), Post-LN.
Gradient clipping at global norm 1 is kept on (not in the paper).

Presets:
- smoke:   1+2 layers, d=32, short sequences of small numbers; seconds on a CPU (tests).
- default: 3+3 layers, d=128, 4 heads, d_ff 512, Post-LN, dropout 0.1, batch 32, lr 1e-3,
           100 warmup steps, 1500 steps; figures in README.md (Results).
- dsinit_matt_12l: 12+12 layers, DS-Init (scheme "ds_init", layer indices counted per stack)
           and the MAtt decoder (`model.merged_attention`), Post-LN as in Zhang et al. 2019;
           otherwise as default.
- vaswani_base: the paper's base model on WMT14 en -> de (see the preset's comment).
Metrics: eval/{validation,test}/{loss, accuracy (teacher-forced tokens), exact_match, bleu}
(decoding, `seq2seq.eval_decode`, of the first train.eval_batches batches, i.e. a fixed set of
sentences).
"""

from __future__ import annotations

import ml_collections

from configs import common
from deepscale_jax.data import numbers, wmt

COMMON = {
    "model.architecture": "encoder_decoder",
    "model.vocab_size": numbers.VOCAB_SIZE,
    "model.position_embedding": "sinusoidal",
    "model.norm_placement": "post",
    "optim.schedule": "inverse_sqrt",
    "optim.weight_decay": 0.0,
    "optim.b1": 0.9,
    "optim.b2": 0.98,
    "optim.eps": 1e-9,
    "seq2seq.scale_embeddings": True,
}

PRESETS = {
    "smoke": {
        "model.num_layers": 2,
        "model.encoder_layers": 1,
        "model.d_model": 32,
        "model.num_heads": 2,
        "model.d_ff": 64,
        "model.max_len": 32,
        "data.max_number": 999,
        "data.validation_size": 16,
        "data.test_size": 16,
        "data.src_len": 32,
        "data.tgt_len": 32,
        "train.num_steps": 6,
        "train.batch_size": 8,
        "train.log_every_steps": 2,
        "train.eval_every_steps": 3,
        "train.eval_batches": 1,
        "optim.warmup_steps": 2,
        "ckpt.every_steps": 3,
    },
    "default": {
        "model.num_layers": 3,
        "model.encoder_layers": 3,
        "model.d_model": 128,
        "model.num_heads": 4,
        "model.d_ff": 512,
        "model.max_len": 80,
        "model.dropout": 0.1,
        "train.num_steps": 1500,
        "train.batch_size": 32,
        "train.log_every_steps": 50,
        "train.eval_every_steps": 500,
        "train.eval_batches": 8,
        "optim.learning_rate": 1e-3,
        "optim.warmup_steps": 100,
        "ckpt.every_steps": 500,
    },
    # Vaswani et al. 2017, Transformer base (Table 3): N = 6 + 6, d = 512, d_ff = 2048, h = 8,
    # P_drop = 0.1, eps_ls = 0.1, warmup 4000 with lrate = d^-0.5 min(step^-0.5,
    # step warmup^-1.5), i.e. peak 512^-0.5 4000^-0.5 = 6.99e-4, 100k steps, no gradient
    # clipping, a shared 37000-token vocabulary, WMT 2014 English -> German, beam 4 with length
    # penalty 0.6 (sec. 6.1), Post-LN. The paper batches ~25k source + 25k target tokens by
    # length; here fixed-shape batches of 256 pairs truncated to 128 tokens. Needs the prepared
    # wmt14_translate data (data/wmt.py); the vocabulary is trained on first use.
    "vaswani_base": {
        "data.name": "wmt14_translate",
        "data.source_language": "en",
        "data.target_language": "de",
        "data.vocab_size": 37000,
        "data.src_len": 128,
        "data.tgt_len": 128,
        "model.vocab_size": 37000,
        "model.num_layers": 6,
        "model.encoder_layers": 6,
        "model.d_model": 512,
        "model.num_heads": 8,
        "model.d_ff": 2048,
        "model.max_len": 128,
        "model.dropout": 0.1,
        "train.num_steps": 100_000,
        "train.batch_size": 256,
        "train.log_every_steps": 100,
        "train.eval_every_steps": 5000,
        "train.eval_batches": 12,
        "optim.learning_rate": 512**-0.5 * 4000**-0.5,
        "optim.warmup_steps": 4000,
        "optim.clip_norm": 0.0,
        "ckpt.every_steps": 5000,
        "seq2seq.eval_decode": "beam",
    },
}
# The default run, 12 + 12 layers deep with DS-Init and the MAtt decoder (Zhang et al. 2019).
PRESETS["dsinit_matt_12l"] = {
    **PRESETS["default"],
    "model.num_layers": 12,
    "model.encoder_layers": 12,
    "scheme.name": "ds_init",
    "model.merged_attention": True,
}


def get_config(arg: str | None = None):
    """The seq2seq config for `arg` = "[preset][,key=value...]" (preset defaults to "default")."""
    config = common.base_config("seq2seq")
    # Every translation data set's options; only those of `data.name` are read.
    config.data = ml_collections.ConfigDict({"name": "numbers", **wmt.DEFAULTS, **numbers.DEFAULTS})
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.data.vocab_path = ml_collections.FieldReference(None, field_type=str)
    config.seq2seq = ml_collections.ConfigDict(
        {
            "scale_embeddings": False,
            "label_smoothing": 0.1,
            "eval_decode": "greedy",
            "beam_size": 4,
            "length_penalty": 0.6,
        }
    )
    common.apply_updates(config, COMMON)
    return common.build(config, PRESETS, arg)
