"""The seq2seq task's metrics: BLEU from summed sufficient statistics is sacrebleu's corpus BLEU;
config presets validate."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sacrebleu.metrics import BLEU

from configs import seq2seq
from deepscale_jax.data import numbers
from deepscale_jax.tasks.seq2seq import bleu_from_statistics, bleu_statistics
from deepscale_jax.train import train_and_evaluate
from deepscale_jax.validation import validate_config


def rows(texts, length=80):
    out = np.full((len(texts), length), numbers.VOCAB.pad_id, np.int32)
    for i, text in enumerate(texts):
        tokens = np.append(numbers.VOCAB.encode(text), numbers.VOCAB.eos_id)
        out[i, : len(tokens)] = tokens
    return out


def test_bleu_statistics_add_up_to_corpus_bleu():
    refs = [numbers.english(n) for n in (21, 345, 1001, 77777)]
    hyps = ["twenty-one", "three hundred and forty-four", "one thousand and one", "seventy"]
    halves = [
        bleu_statistics(rows(hyps[i : i + 2]), rows(refs[i : i + 2]), numbers.VOCAB) for i in (0, 2)
    ]
    expected = BLEU().corpus_score(hyps, [refs]).score
    assert bleu_from_statistics(halves[0] + halves[1]) == pytest.approx(expected)
    perfect = bleu_statistics(rows(refs), rows(refs), numbers.VOCAB)
    assert bleu_from_statistics(perfect) == pytest.approx(100.0)


@pytest.mark.parametrize("preset", ["smoke", "default", "dsinit_matt_12l", "vaswani_base"])
def test_presets_validate(preset):
    model, scheme = validate_config(seq2seq.get_config(preset))
    assert model.architecture == "encoder_decoder"
    assert scheme.stack == "decoder" and scheme.for_stack("encoder").stack == "encoder"
    if preset == "vaswani_base":  # Vaswani et al. 2017, Table 3, base
        shape = (model.num_layers, model.encoder_layers, model.d_model, model.d_ff)
        assert shape == (6, 6, 512, 2048) and model.num_heads == 8
        assert model.vocab_size == 37000 and model.norm_placement == "post"
    else:
        assert model.vocab_size == numbers.VOCAB_SIZE


def test_wmt_task_trains_and_reports_bleu_under_mock_data(tmp_path):
    """The real WMT loader through the task: SentencePiece trained on (mock) training pairs,
    two steps on 8 devices, beam-search BLEU on the test split."""
    config = seq2seq.get_config(
        "smoke,data.name=wmt14_translate,data.vocab_size=64,model.vocab_size=64,"
        "data.src_len=32,data.tgt_len=32,steps=2,train.eval_every_steps=2,"
        "ckpt.every_steps=2,seq2seq.eval_decode=beam,seq2seq.beam_size=2"
    )
    config.data.vocab_path = str(tmp_path / "spm.model")
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=64):
        final = train_and_evaluate(config, str(tmp_path / "run"))
    assert os.path.exists(config.data.vocab_path)
    assert 0.0 <= final["eval/test/bleu"] <= 100.0 and final["eval/test/sentences"] == 8
    assert np.isfinite(final["eval/test/loss"])


def test_bad_vocab_names_the_field():
    with pytest.raises(ValueError, match="model.vocab_size=256 must be 259"):
        validate_config(seq2seq.get_config("smoke,model.vocab_size=256"))
