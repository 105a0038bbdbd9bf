"""Command-line entry point.

    python -m deepscale_jax.main --config=configs/<task>.py[:preset[,key=value...]] --workdir=DIR

with <task> one of lm, mlm, seq2seq, vit (configs/).

`--config` is an ml_collections config file; any field can be overridden with
`--config.section.field=value`. Rerunning the same command resumes from DIR's latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from deepscale_jax.train import format_scores, train_and_evaluate
from deepscale_jax.validation import check_workdir, validate_config

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:  # Bad input: one clear line, no traceback.
        validate_config(FLAGS.config)
        check_workdir(FLAGS.workdir)
    except ValueError as err:
        sys.exit(f"deepscale_jax: error: {err}")
    final = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    scores = {k: v for k, v in final.items() if k.startswith("eval/")}
    if scores:
        print(f"final {format_scores(scores)}", flush=True)


if __name__ == "__main__":
    app.run(main)
