"""WMT loaders (data/wmt.py) through the real TFDS builders, with `tfds.testing.mock_data`.

With `MockPolicy.USE_CODE`, `tfds.data_source('wmt14_translate/de-en', split=...)` returns
an ArrayRecord-like source of random `{'de': str, 'en': str}` records (letters a-j and
spaces, deterministic; slicing is ignored). It needs the builders registered, which
importing data/wmt.py does (TFDS imports its `translate` builders lazily).
"""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from deepscale_jax.data import wmt

NUM_EXAMPLES = 48
VOCAB_SIZE = 64
GERMAN = [
    "Grüße aus Köln: die Straße ist schön.",
    "Äpfel, Öl und Übermut sind größer als Füße.",
    "Der Bär ißt süße Brötchen im Frühling.",
] * 20


@pytest.fixture
def mock():
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def data_config(tmp_path, name="wmt14_translate", **kwargs):
    config = dict(name=name, vocab_path=str(tmp_path / "spm" / f"{name}.model"))
    config.update(vocab_size=VOCAB_SIZE, src_len=24, tgt_len=20, vocab_train_sentences=1000)
    config.update(kwargs)
    return ConfigDict(config)


def make(config, **kwargs):
    args = dict(split="train", global_batch_size=4, seed=0, shuffle=True, repeat=True)
    args.update(process_index=0, process_count=1)
    args.update(kwargs)
    return wmt.make_iterator(config, **args)


def valid_part(row, valid):
    return row[: int(valid.sum())]


@pytest.mark.parametrize("name", wmt.DATASETS)
def test_batches_are_well_formed(mock, tmp_path, name):
    config = data_config(tmp_path, name)
    record = tfds.data_source(f"{name}/de-en", split="validation")[0]
    assert isinstance(record["de"], str) and isinstance(record["en"], str)
    batches = list(make(config, split="validation", shuffle=False, repeat=False))
    assert len(batches) == NUM_EXAMPLES // 4
    vocab = wmt.vocabulary(config)
    assert vocab.vocab_size <= VOCAB_SIZE
    for b in batches:
        assert set(b) == {
            "inputs",
            "inputs_valid",
            "decoder_inputs",
            "targets",
            "targets_valid",
            "weights",
        }
        assert b["inputs"].shape == b["inputs_valid"].shape == (4, 24)
        for key in ("decoder_inputs", "targets", "targets_valid", "weights"):
            assert b[key].shape == (4, 20)
        for key in ("inputs", "decoder_inputs", "targets"):
            assert b[key].dtype == np.int32
            assert b[key].min() >= 0 and b[key].max() < vocab.vocab_size
        assert b["inputs_valid"].dtype == b["targets_valid"].dtype == np.bool_
        assert b["weights"].dtype == np.float32
        np.testing.assert_array_equal(b["weights"], b["targets_valid"])
        assert (b["decoder_inputs"][:, 0] == vocab.bos_id).all()
        for i in range(4):
            inputs = valid_part(b["inputs"][i], b["inputs_valid"][i])
            targets = valid_part(b["targets"][i], b["targets_valid"][i])
            assert inputs[-1] == vocab.eos_id and vocab.eos_id not in inputs[:-1]
            assert targets[-1] == vocab.eos_id
            np.testing.assert_array_equal(targets[:-1], b["decoder_inputs"][i][1 : len(targets)])
    # The first unshuffled example is the first record, pair by pair.
    first = tfds.data_source(f"{name}/de-en", split="validation")[0]
    assert vocab.decode(batches[0]["inputs"][0]) == vocab.decode(vocab.encode(first["de"]))
    assert vocab.decode(batches[0]["targets"][0]) == vocab.decode(vocab.encode(first["en"]))


def test_reversed_direction(mock, tmp_path):
    config = data_config(tmp_path, source_language="en", target_language="de")
    batch = next(make(config, split="test", shuffle=False, repeat=False))
    first = tfds.data_source("wmt14_translate/de-en", split="test")[0]
    vocab = wmt.vocabulary(config)
    assert vocab.decode(batch["inputs"][0]) == vocab.decode(vocab.encode(first["en"]))


def test_vocabulary_round_trips_umlauts_and_special_ids(tmp_path):
    path = wmt.train_vocabulary(iter(GERMAN), tmp_path / "a" / "de.model", 100)
    vocab = wmt.SentencePieceVocabulary(path)
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id) == (0, 2, 3)
    for text in ("Grüße aus Köln", "Übermut, Öl, Äpfel und süße Füße", GERMAN[2]):
        ids = vocab.encode(text)
        assert ids.dtype == np.int32 and (ids > 3).all()
        assert vocab.decode(ids) == text
        assert vocab.decode([vocab.bos_id, *ids, vocab.eos_id, 7, 8]) == text
        assert vocab.decode([*ids, vocab.pad_id, 7]) == text
    assert os.listdir(tmp_path / "a") == ["de.model"]  # No temporary file left behind.


def test_byte_fallback_spells_unseen_characters(tmp_path):
    path = wmt.train_vocabulary(iter(GERMAN), tmp_path / "big.model", 2000)
    vocab = wmt.SentencePieceVocabulary(path)
    assert 260 < vocab.vocab_size <= 2000  # hard_vocab_limit=False: a tiny corpus trains.
    assert vocab.decode(vocab.encode("Zürich ñ 漢")) == "Zürich ñ 漢"


def test_vocabulary_is_trained_once_then_loaded(mock, tmp_path, monkeypatch):
    config = data_config(tmp_path)
    first = wmt.vocabulary(config)
    path = wmt.vocab_path(config)
    mtime = os.stat(path).st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("trained twice")

    monkeypatch.setattr(wmt, "train_vocabulary", no_training)
    again = wmt.vocabulary(config)
    assert os.stat(path).st_mtime_ns == mtime
    text = "abc hij"
    np.testing.assert_array_equal(first.encode(text), again.encode(text))
    # Other processes only load (or wait for) the file.
    np.testing.assert_array_equal(
        wmt.vocabulary(config, process_index=1).encode(text), first.encode(text)
    )


def test_other_processes_wait_for_process_0(mock, tmp_path, monkeypatch):
    monkeypatch.setattr(wmt, "WAIT_TIMEOUT_S", 0.05)
    with pytest.raises(TimeoutError, match=r"process 1 waited.*shared by all processes"):
        wmt.vocabulary(data_config(tmp_path), process_index=1)


def test_default_vocab_path(tmp_path):
    config = ConfigDict(dict(name="wmt17_translate", data_dir=str(tmp_path), vocab_size=8000))
    expected = tmp_path / "sentencepiece" / "wmt17_translate_de-en_8000.model"
    assert wmt.vocab_path(config) == str(expected)


@pytest.mark.parametrize("kwargs", [dict(), dict(process_index=1, process_count=2)])
def test_checkpoint_resume_matches_uninterrupted(mock, tmp_path, kwargs):
    config = data_config(tmp_path)
    wmt.vocabulary(config, process_index=0)  # Process 1 would wait for process 0 to train it.
    it = make(config, **kwargs)
    for _ in range(15):  # Past one epoch of 12 batches.
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = make(config, **kwargs)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_not_prepared_says_how_to_prepare(tmp_path):
    config = data_config(tmp_path, data_dir=str(tmp_path / "tfds"))
    build = r"tfds build wmt14_translate/de-en --file_format=array_record"
    with pytest.raises(RuntimeError, match=rf"wmt14_translate/de-en is not prepared.*{build}"):
        make(config)
    assert not os.path.exists(wmt.vocab_path(config))


def test_bad_options(mock, tmp_path):
    with pytest.raises(ValueError, match=r"data.name='wmt99'.*wmt14_translate"):
        make(data_config(tmp_path, name="wmt99"))
    with pytest.raises(ValueError, match=r"data.source_language='fr' is not in data.config"):
        make(data_config(tmp_path, source_language="fr"))
    with pytest.raises(ValueError, match=r"no config 'xx-en'"):
        make(data_config(tmp_path, config="xx-en"))
    with pytest.raises(ValueError, match=r"split='dev'"):
        make(data_config(tmp_path), split="dev")
    with pytest.raises(ValueError, match=r"data.src_len=2"):
        next(make(data_config(tmp_path, truncate=False, src_len=2)))


def test_unwritable_vocab_path(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(PermissionError, match=r"cannot write the SentencePiece model"):
        wmt.train_vocabulary(iter(GERMAN), tmp_path / "file" / "de.model", 100)
