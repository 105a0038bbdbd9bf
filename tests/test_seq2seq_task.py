"""The seq2seq task's metrics: BLEU from summed sufficient statistics is sacrebleu's corpus BLEU;
config presets validate."""

import numpy as np
import pytest
from sacrebleu.metrics import BLEU

from configs import seq2seq
from deepscale_jax.data import numbers
from deepscale_jax.tasks.seq2seq import bleu_from_statistics, bleu_statistics
from deepscale_jax.validation import validate_config


def rows(texts, length=80):
    out = np.full((len(texts), length), numbers.PAD_ID, np.int32)
    for i, text in enumerate(texts):
        tokens = np.append(numbers.encode(text), numbers.EOS_ID)
        out[i, : len(tokens)] = tokens
    return out


def test_bleu_statistics_add_up_to_corpus_bleu():
    refs = [numbers.english(n) for n in (21, 345, 1001, 77777)]
    hyps = ["twenty-one", "three hundred and forty-four", "one thousand and one", "seventy"]
    halves = [bleu_statistics(rows(hyps[i : i + 2]), rows(refs[i : i + 2])) for i in (0, 2)]
    expected = BLEU().corpus_score(hyps, [refs]).score
    assert bleu_from_statistics(halves[0] + halves[1]) == pytest.approx(expected)
    perfect = bleu_statistics(rows(refs), rows(refs))
    assert bleu_from_statistics(perfect) == pytest.approx(100.0)


@pytest.mark.parametrize("preset", ["smoke", "default", "dsinit_matt_12l"])
def test_presets_validate(preset):
    model, scheme = validate_config(seq2seq.get_config(preset))
    assert model.architecture == "encoder_decoder" and model.vocab_size == numbers.VOCAB_SIZE
    assert scheme.stack == "decoder" and scheme.for_stack("encoder").stack == "encoder"


def test_bad_vocab_names_the_field():
    with pytest.raises(ValueError, match="model.vocab_size=256 must be 259"):
        validate_config(seq2seq.get_config("smoke,model.vocab_size=256"))
