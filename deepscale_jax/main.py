"""Command-line entry point.

    python -m deepscale_jax.main --config=configs/lm.py[:preset[,key=value...]] --workdir=DIR

`--config` is an ml_collections config file; any field can be overridden with
`--config.section.field=value`. Rerunning the same command resumes from DIR's latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from deepscale_jax.train import train_and_evaluate
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
    if "eval/validation/bits_per_byte" in final:
        print(
            f"final validation: loss {final['eval/validation/loss']:.4f} nats/byte, "
            f"{final['eval/validation/bits_per_byte']:.3f} bits/byte",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
