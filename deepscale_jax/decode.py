"""Greedy decoding and beam search for the seq2seq model (models/seq2seq.py), with caches.

Both run the `decode=True` copy of the model (`decoding_model`) on parameters in its layout
(`Seq2Seq`'s `decode_params`): the source is encoded once; one call on a dummy target of the
maximum length creates the "cache" (zero self-attention keys/values, the cross-attention
keys/values of the encoder output, computed once per sentence, and MAtt's zero running sum);
then every step feeds one token at position t and reads/updates the cache (nn/attention.py).

- `greedy_decode`: y_t = argmax p(y | y_<t, x), for `max_len` steps from BOS; after EOS the
  output is PAD.
- `beam_search`: beam size K with the GNMT length penalty (Wu et al. 2016, eq. 14;
  Vaswani et al. 2017 sec. 6.1 use K = 4, alpha = 0.6):
      s(Y) = log P(Y | X) / lp(Y),   lp(Y) = ((5 + |Y|) / 6)^alpha,
  |Y| counting the generated tokens including EOS. A hypothesis that emits EOS is finished
  and stays in the beam, frozen (it proposes only itself, unchanged); at every step the K
  best of {finished hypotheses} u {extensions of the unfinished ones} by s(.) are kept, and
  the search stops when all K are finished or after `max_len` tokens. The best s(.) wins.
  With K = 1 all candidates at a step have the same length, so the argmax of s is the argmax
  of the next-token probability: beam 1 is exactly greedy decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from deepscale_jax.models.seq2seq import Seq2Seq, decode_params

NEG = -1.0e9


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The vocabulary's start, end and padding ids (data/translation.py `Vocabulary`)."""

    bos: int
    eos: int
    pad: int

    @classmethod
    def of(cls, vocab) -> SpecialIds:
        return cls(vocab.bos_id, vocab.eos_id, vocab.pad_id)


def decoding_model(model: Seq2Seq) -> Seq2Seq:
    return model.clone(decode=True, deterministic=True)


def _start(model: Seq2Seq, params: Any, inputs, inputs_valid, batch: int, max_len: int, bos: int):
    """(decode model, its params, encoder output, source validity, the fresh cache), with
    encoder output and validity repeated to `batch` rows (beam search: B * K)."""
    dmodel = decoding_model(model)
    dparams = decode_params(params, model.config)
    encoded = dmodel.apply({"params": dparams}, inputs, inputs_valid, method=Seq2Seq.encode)
    repeat = batch // inputs.shape[0]
    encoded = jnp.repeat(encoded, repeat, axis=0)
    valid = jnp.repeat(inputs_valid, repeat, axis=0)
    dummy = jnp.full((batch, max_len), bos, jnp.int32)
    _, variables = dmodel.apply(
        {"params": dparams}, dummy, encoded, valid, method=Seq2Seq.decode_logits, mutable=["cache"]
    )
    return dmodel, dparams, encoded, valid, variables["cache"]


def _step(dmodel, dparams, cache, tokens, step, encoded, valid):
    """Log-probabilities (rows, vocab) of the token after `tokens` (rows,) at position `step`."""
    logits, variables = dmodel.apply(
        {"params": dparams, "cache": cache},
        tokens[:, None],
        encoded,
        valid,
        None,
        step,
        True,
        method=Seq2Seq.decode_logits,
        mutable=["cache"],
    )
    return jax.nn.log_softmax(logits[:, 0]), variables["cache"]


def greedy_decode(
    model: Seq2Seq,
    params: Any,
    inputs: jax.Array,
    inputs_valid: jax.Array,
    max_len: int,
    ids: SpecialIds,
) -> jax.Array:
    """(B, max_len) int32 greedy outputs (EOS included, PAD after it)."""
    batch = inputs.shape[0]
    dmodel, dparams, encoded, valid, cache = _start(
        model, params, inputs, inputs_valid, batch, max_len, ids.bos
    )

    def body(t, carry):
        cache, token, done, out = carry
        log_probs, cache = _step(dmodel, dparams, cache, token, t, encoded, valid)
        nxt = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, ids.pad, nxt)
        out = out.at[:, t].set(nxt)
        return cache, nxt, done | (nxt == ids.eos), out

    init = (
        cache,
        jnp.full((batch,), ids.bos, jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.full((batch, max_len), ids.pad, jnp.int32),
    )
    return jax.lax.fori_loop(0, max_len, body, init)[3]


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT lp(Y) = ((5 + |Y|) / 6)^alpha."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(
    model: Seq2Seq,
    params: Any,
    inputs: jax.Array,
    inputs_valid: jax.Array,
    max_len: int,
    ids: SpecialIds,
    beam_size: int = 4,
    alpha: float = 0.6,
) -> tuple[jax.Array, jax.Array]:
    """(best sequences (B, max_len) int32 with PAD after EOS, their scores s(Y) (B,))."""
    batch, k = inputs.shape[0], beam_size
    dmodel, dparams, encoded, valid, cache = _start(
        model, params, inputs, inputs_valid, batch * k, max_len, ids.bos
    )
    vocab = model.config.vocab_size

    def gather(tree, beam_index):  # beam_index (B, K) -> rows of the flattened (B*K) cache
        rows = (jnp.arange(batch)[:, None] * k + beam_index).reshape(-1)
        return jax.tree.map(lambda a: a[rows] if a.ndim and a.shape[0] == batch * k else a, tree)

    def cond(carry):
        t, _, _, _, _, finished, _ = carry
        return (t < max_len) & ~jnp.all(finished)

    def body(carry):
        t, cache, seqs, log_p, lengths, finished, last = carry
        step_lp, cache = _step(dmodel, dparams, cache, last.reshape(-1), t, encoded, valid)
        step_lp = step_lp.reshape(batch, k, vocab)
        grow = log_p[..., None] + step_lp  # (B, K, V) extensions of unfinished hypotheses
        grow = jnp.where(finished[..., None], NEG, grow)
        grow_score = grow / length_penalty(lengths + 1, alpha)[..., None]
        keep = jnp.where(  # a finished hypothesis proposes itself once, as token PAD
            finished, log_p / length_penalty(lengths, alpha), NEG
        )
        keep_scores = jnp.full((batch, k, vocab), NEG).at[:, :, ids.pad].set(keep)
        scores = jnp.where(finished[..., None], keep_scores, grow_score).reshape(batch, k * vocab)
        top_scores, flat = jax.lax.top_k(scores, k)
        beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        was_finished = jnp.take_along_axis(finished, beam, axis=1)
        new_log_p = jnp.where(
            was_finished,
            jnp.take_along_axis(log_p, beam, axis=1),
            jnp.take_along_axis(grow.reshape(batch, k * vocab), flat, axis=1),
        )
        seqs = jnp.take_along_axis(seqs, beam[..., None], axis=1)
        seqs = seqs.at[:, :, t].set(jnp.where(was_finished, ids.pad, token))
        lengths = jnp.take_along_axis(lengths, beam, axis=1) + (~was_finished)
        finished = was_finished | (token == ids.eos)
        del top_scores
        return t + 1, gather(cache, beam), seqs, new_log_p, lengths, finished, token

    log_p = jnp.tile(jnp.array([0.0] + [NEG] * (k - 1), jnp.float32), (batch, 1))
    init = (
        jnp.zeros((), jnp.int32),
        cache,
        jnp.full((batch, k, max_len), ids.pad, jnp.int32),
        log_p,
        jnp.zeros((batch, k), jnp.int32),
        jnp.zeros((batch, k), bool),
        jnp.full((batch, k), ids.bos, jnp.int32),
    )
    _, _, seqs, log_p, lengths, _, _ = jax.lax.while_loop(cond, body, init)
    final = log_p / length_penalty(lengths, alpha)
    best = jnp.argmax(final, axis=1)
    return (
        jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0],
        jnp.take_along_axis(final, best[:, None], axis=1)[:, 0],
    )
