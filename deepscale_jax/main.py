"""Command-line entry point.

    python -m deepscale_jax.main --config=configs/<task>.py[:preset[,key=value...]] --workdir=DIR

with <task> one of lm, mlm, seq2seq, vit (configs/).

`--config` is an ml_collections config file; any field can be overridden with
`--config.section.field=value`. Rerunning the same command resumes from DIR's latest checkpoint.

Multi-process runs (deepscale_jax/distributed.py) add `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` on every process, or `--distributed` alone on a TPU pod or
under SLURM/MPI; `python -m deepscale_jax.launch` starts N such processes on one machine.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from deepscale_jax import distributed
from deepscale_jax.checkpoint import CheckpointSaveError
from deepscale_jax.data.sources import CorruptDataError
from deepscale_jax.train import TrainingDiverged, format_scores, train_and_evaluate
from deepscale_jax.validation import check_workdir, validate_config

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.DEFINE_string(
    "coordinator_address",
    None,
    f"Multi-process: HOST:PORT of process 0 (default ${distributed.ENV_COORDINATOR}).",
)
flags.DEFINE_integer(
    "num_processes",
    None,
    f"Multi-process: processes in the run (${distributed.ENV_NUM_PROCESSES}).",
)
flags.DEFINE_integer(
    "process_id", None, f"Multi-process: this process, 0..N-1 (${distributed.ENV_PROCESS_ID})."
)
flags.DEFINE_bool(
    "distributed",
    False,
    "Multi-process with JAX's cluster detection (TPU pod hosts, SLURM srun, mpirun, GKE).",
)
flags.DEFINE_string(
    "compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR")
    or os.path.join(os.path.expanduser("~"), ".cache", "deepscale_jax", "jax_compilation_cache"),
    "JAX's persistent compilation cache: a rerun (resume, sweep point) loads the compiled "
    "train and eval steps instead of compiling again; '' turns it off.",
)
flags.DEFINE_bool(
    "traceback", False, "Show the traceback of a bad-input error instead of one line."
)
flags.mark_flags_as_required(["config", "workdir"])

# Errors that say what to change (a bad config value or flag, unreadable data, a failed save, a
# diverged run): one line and exit status 1, unless --traceback.
USER_ERRORS = (ValueError, CorruptDataError, CheckpointSaveError, TrainingDiverged)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        spec = distributed.resolve_spec(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed
        )
        validate_config(FLAGS.config)
        check_workdir(FLAGS.workdir)
        distributed.initialize(spec)
        if FLAGS.compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
        if not distributed.is_main_process():
            logging.set_verbosity(logging.ERROR)
        final = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except USER_ERRORS as err:
        if FLAGS.traceback:
            raise
        sys.exit(f"deepscale_jax: error: {err}")
    scores = {k: v for k, v in final.items() if k.startswith("eval/")}
    if scores:
        distributed.announce(f"final {format_scores(scores)}")


if __name__ == "__main__":
    app.run(main)
