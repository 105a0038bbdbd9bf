"""The one training loop: `train_and_evaluate(config, workdir)`, for every task.

What is task-specific (model, batches, loss, eval metrics) comes from the task registered as
`config.task` (deepscale_jax/tasks/); the loop itself knows none of it.

Parameters are created already sharded (`jax.eval_shape`, then `jit(init, out_shardings=...)`);
the train step is jitted with explicit in/out shardings and a donated state; one root key, and
`fold_in(rng, step)` gives each step its dropout key. Per-step metrics are summed on the device;
at a log step their copy to the host starts and is read after the next step is dispatched, so
the host never idles the device (eval and checkpoint steps wait). A rerun with the same workdir
resumes from the latest checkpoint (params, optimizer state, step, rng and the data iterator's
position).

Reliability (README "Reliability"):
- Divergence guard: a step whose loss or any gradient is non-finite is skipped inside the jitted
  step (params and optimizer state, hence the optimizer's step count and the learning-rate
  schedule, stay as they were) while the step counter and the data still advance (that batch is
  dropped), so a run with a skipped step is as deterministic as one without. `TrainState` counts
  the current streak (`bad_steps`) and the total (`skipped_steps`, logged as
  `train/skipped_steps`). When the streak reaches `train.max_bad_steps` the state freezes (no
  later step updates it or resets the streak) and the host raises a RuntimeError at the first
  log, eval or checkpoint step at or after that step (the counters are read only there, next to
  the metrics fetch; a log-only step is reported after the next step's dispatch). No checkpoint
  is saved while a streak is under way, so the latest checkpoint is always a good state; the
  error names it.
- Preemption: SIGTERM (single-process runs; multi-process runs use orbax's preemption sync
  point) lets the current step finish, saves a checkpoint of it, waits for the save and returns
  normally; rerunning the same command resumes.
- Restart after a kill: unfinished orbax save directories (`<step>.orbax-checkpoint-tmp*`) are
  deleted before the checkpoint manager starts, and metrics.jsonl records after the step the run
  resumes from are dropped, so a resumed run's metrics hold each step once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from tqdm import tqdm

from deepscale_jax import distributed, flops, sharding
from deepscale_jax.checkpoint import (
    Checkpointer,
    abstract_state,
    checkpoint_metadata,
    remove_unfinished_checkpoints,
)
from deepscale_jax.data.device_feed import DeviceFeed, to_global
from deepscale_jax.metrics import (
    LAYER_NORMS,
    IntervalMeter,
    MetricWriter,
    PendingInterval,
    truncate_metrics,
)
from deepscale_jax.optim import make_optimizer, make_schedule
from deepscale_jax.preemption import Preemption
from deepscale_jax.spikes import SpikeDetector, layer_grad_norms
from deepscale_jax.tasks import Task, build_task
from deepscale_jax.validation import check_workdir, validate_config

SPEED_LABELS = {"tokens": "tok_s", "examples": "ex_s"}  # progress-bar names of perf/<unit>_per_sec


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    bad_steps: jax.Array  # current streak of skipped (non-finite) steps; 0 after a good step
    skipped_steps: jax.Array  # skipped steps in total


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: tuple,
    seed: int,
    init_inputs: tuple[jax.Array, ...],
) -> tuple[TrainState, TrainState]:
    """(state created sharded on `mesh`, the state's shardings); `init_inputs` are example model
    inputs (`Task.init_inputs()`) that `model.init` traces."""
    root = jax.random.PRNGKey(seed)
    init_key, train_key = jax.random.split(root)

    def boxed_params() -> Any:
        return model.init({"params": init_key}, *init_inputs)["params"]

    def init_state() -> TrainState:
        params = nn.meta.unbox(boxed_params())
        zero = jnp.zeros((), jnp.int32)
        return TrainState(zero, params, tx.init(params), train_key, zero, zero)

    param_shardings = sharding.param_shardings(jax.eval_shape(boxed_params), mesh, rules)
    repl = sharding.replicated(mesh)
    abstract = jax.eval_shape(init_state)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract.opt_state,
        param_shardings,
        transform_non_params=lambda _: repl,
    )
    shardings = TrainState(repl, param_shardings, opt_shardings, repl, repl, repl)
    state = jax.jit(init_state, out_shardings=shardings)()
    return state, shardings


DEFAULT_MAX_BAD_STEPS = 10


def all_finite(tree: Any) -> jax.Array:
    """True iff every element of every array in `tree` is finite."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def make_train_step(
    task: Task,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    max_bad_steps: int = DEFAULT_MAX_BAD_STEPS,
    layer_norms: bool = False,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """One step; a step with a non-finite loss or gradient is skipped (see the module doc), and
    once `max_bad_steps` consecutive steps were skipped every later step is skipped too.
    `layer_norms` adds each stack's per-layer gradient norms (`LAYER_NORMS` + stack, zeros on a
    skipped step) for spike detection (spikes.py).

    Per-step metrics: `train/loss` and `train/grad_norm` (0 on a skipped step; `IntervalMeter`
    averages them over the interval's applied steps), `train/learning_rate` (the one the
    optimizer applied: the schedule at the optimizer's count, step - skipped_steps) and
    `train/skipped` (1.0 on a skipped step)."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        dropout_key = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params: Any) -> jax.Array:
            total, count = task.loss(
                params, batch, deterministic=False, rngs={"dropout": dropout_key}
            )
            return total / count

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        apply = jnp.isfinite(loss) & all_finite(grads) & (state.bad_steps < max_bad_steps)

        def keep(new: Any, old: Any) -> Any:
            return jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)

        skipped = (~apply).astype(jnp.int32)
        metrics = {
            "train/loss": jnp.where(apply, loss, 0.0),
            "train/grad_norm": jnp.where(apply, grad_norm, 0.0),
            "train/learning_rate": schedule(state.step - state.skipped_steps),
            "train/skipped": skipped.astype(jnp.float32),
        }
        if layer_norms:
            for stack, norms in layer_grad_norms(grads).items():
                metrics[LAYER_NORMS + stack] = jnp.where(apply, norms, 0.0)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            bad_steps=jnp.where(apply, 0, state.bad_steps + 1),
            skipped_steps=state.skipped_steps + skipped,
        )
        return new_state, metrics

    return train_step


def jit_train_step(
    task: Task,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    state_shardings: TrainState,
    batch_sharding: jax.sharding.NamedSharding,
    max_bad_steps: int = DEFAULT_MAX_BAD_STEPS,
    layer_norms: bool = False,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The train step jitted with explicit shardings and the state donated."""
    return jax.jit(
        make_train_step(task, tx, schedule, max_bad_steps, layer_norms),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(batch_sharding.mesh)),
        donate_argnums=0,
    )


def jit_eval_step(
    task: Task, param_shardings: Any, batch_sharding: jax.sharding.NamedSharding
) -> Callable[[Any, dict], dict[str, jax.Array]]:
    """`task.eval_stats` jitted: (params, batch) -> dict of per-batch sums."""
    return jax.jit(
        task.eval_stats,
        in_shardings=(param_shardings, batch_sharding),
        out_shardings=sharding.replicated(batch_sharding.mesh),
    )


def evaluate(
    task: Task, eval_step: Callable, params: Any, batch_sharding: Any, max_batches: int
) -> dict[str, float]:
    """`eval/<split>/<metric>` for every eval split of the task, each over its first
    `max_batches` batches (-1 = the whole split): the per-batch sums of `eval_step` are added
    up on the host, then `task.eval_metrics` turns the totals into metrics."""
    scores: dict[str, float] = {}
    for split in task.eval_splits:
        totals: dict[str, float] = {}
        batches = 0
        for batch in task.iterator(split, training=False):
            if max_batches != -1 and batches >= max_batches:
                break
            for name, value in eval_step(params, to_global(batch, batch_sharding)).items():
                totals[name] = totals.get(name, 0.0) + float(value)
            batches += 1
        if batches == 0:
            raise ValueError(f"the {split} split yielded no batch: lower train.batch_size/seq_len")
        metrics = task.eval_metrics(totals)
        scores.update({f"eval/{split}/{name}": value for name, value in metrics.items()})
    return scores


def format_scores(scores: dict[str, float]) -> str:
    """'validation loss 1.2345, bits_per_byte 1.781; test ...' from `eval/<split>/<name>` keys."""
    by_split: dict[str, list[str]] = {}
    for key, value in scores.items():
        _, split, name = key.split("/", 2)
        by_split.setdefault(split, []).append(f"{name} {value:.4f}")
    return "; ".join(f"{split} {', '.join(parts)}" for split, parts in by_split.items())


def performance_model(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """IntervalMeter's FLOP arguments: the analytic training FLOPs per step (flops.py), the
    device count and one device's peak FLOP/s in the model's dtype (the data-sheet figure, or
    on CPU the measured large-matmul rate shared by this process's simulated devices)."""
    devices = jax.devices()
    peak = flops.peak_flops_per_device(devices[0], config.model.dtype)
    if devices[0].platform == "cpu":
        peak /= jax.local_device_count()  # forced host devices share the machine's cores
    return {
        "flops_per_step": flops.train_flops_per_step_for(config),
        "num_devices": len(devices),
        "peak_flops_per_device": peak,
    }


class TrainingDiverged(RuntimeError):
    """`train.max_bad_steps` consecutive steps had a non-finite loss or gradient."""


def _diverged(step: int, bad_steps: int, max_bad_steps: int, ckpt: Checkpointer) -> Exception:
    """The error for a streak of `bad_steps` skipped steps ending at `step` (>= the limit)."""
    first = step - bad_steps + 1
    limit = first + max_bad_steps - 1
    ckpt.wait()
    latest = ckpt.latest_step()
    if latest is None:
        kept = "no checkpoint was saved before it"
    else:
        path = os.path.join(ckpt.directory, str(latest))
        kept = f"the last good checkpoint is {path} (step {latest}), kept as it was"
    return TrainingDiverged(
        f"training diverged: {max_bad_steps} consecutive steps ({first}..{limit}, "
        f"train.max_bad_steps={max_bad_steps}) had a non-finite loss or gradient, so their "
        f"updates were skipped; stopped at step {step}; {kept}"
    )


@jax.jit
def _copy_counters(bad_steps: jax.Array, skipped_steps: jax.Array) -> tuple[jax.Array, jax.Array]:
    return bad_steps + 0, skipped_steps + 0


def step_counters(state: TrainState) -> tuple[jax.Array, jax.Array]:
    """Copies of (bad_steps, skipped_steps) that outlive `state` (donated to the next step)."""
    return _copy_counters(state.bad_steps, state.skipped_steps)


def train_loop(
    config: ml_collections.ConfigDict,
    task: Task,
    state: TrainState,
    train_step: Callable,
    eval_step: Callable,
    feed: DeviceFeed,
    batch_sharding: jax.sharding.NamedSharding,
    ckpt: Checkpointer,
    writer: MetricWriter,
    start: int,
    preemption: Preemption | None = None,
) -> tuple[dict[str, float], int | None]:
    """Steps start+1 .. train.num_steps with logging, evaluation and checkpoints; returns (the
    last value of every metric, the step the run stopped at on a preemption or None). A log
    step's metrics and skipped-step counters are reported once the next step is dispatched (a
    streak that reached `train.max_bad_steps` is then raised one step later, the state being
    frozen); eval and checkpoint steps read them at once.

    On a preemption (`preemption.reached(step)` before the last step) the step is logged and
    checkpointed (not evaluated) and the loop returns once the save is complete; no checkpoint is
    saved during a streak of skipped steps. Raises `TrainingDiverged` (see the module doc)."""
    num_steps = config.train.num_steps
    max_bad_steps = config.train.max_bad_steps
    spike_factor = config.train.get("spike_factor", 0.0)
    perf = performance_model(config)
    progress = tqdm(
        total=num_steps,
        initial=start,
        desc="train",
        unit="step",
        mininterval=1.0,
        disable=not distributed.is_main_process(),
        dynamic_ncols=True,
    )
    say = progress.write if distributed.is_main_process() else (lambda message: None)
    final: dict[str, float] = {}
    try:
        t_compile = time.perf_counter()
        batch = next(feed)
        compiled = train_step.lower(state, batch).compile()
        compile_seconds = time.perf_counter() - t_compile
        writer.write(start, {"perf/compile_seconds": compile_seconds})
        say(f"train step compiled in {compile_seconds:.1f} s")
        meter = IntervalMeter(task.units_per_step(), task.unit, **perf)
        spikes = SpikeDetector(spike_factor) if spike_factor else None
        interval_start = start + 1
        speed = f"perf/{task.unit}_per_sec"

        def report(step: int, interval: PendingInterval) -> int:
            """Writes the interval ending at `step`; returns the streak of skipped steps."""
            nonlocal interval_start
            scalars, layer_stats, (bad_steps, skipped_steps) = interval.result()
            scalars["train/skipped_steps"] = int(skipped_steps)
            if spikes is not None and layer_stats is not None:
                spike = spikes.update(
                    interval_start,
                    step,
                    scalars["train/loss"],
                    layer_stats.loss_max,
                    layer_stats.at_max,
                    layer_stats.mean,
                )
                if spike is not None:
                    say(f"step {step}: {spike.message()}")
                    logging.warning("%s", spike.message())
                    scalars.update(spike.metrics())
            interval_start = step + 1
            writer.write(step, scalars)
            final.update(scalars)
            progress.set_postfix(
                loss=f"{scalars['train/loss']:.3f}",
                **{SPEED_LABELS.get(task.unit, "it_s"): f"{scalars[speed]:.0f}"},
                mfu=f"{scalars['perf/mfu']:.1%}" if "perf/mfu" in scalars else "n/a",
            )
            return int(bad_steps)

        pending: tuple[int, PendingInterval] | None = None  # a log step's metrics in flight
        for step in range(start + 1, num_steps + 1):
            if step > start + 1:
                batch = next(feed)
            state, metrics = compiled(state, batch)
            if pending is not None:  # fetched while this step runs
                bad_steps = report(*pending)
                if bad_steps >= max_bad_steps:
                    raise _diverged(pending[0], bad_steps, max_bad_steps, ckpt)
                pending = None
            meter.add(metrics)
            progress.update(1)
            stop = preemption is not None and preemption.reached(step) and step < num_steps
            log = stop or step % config.train.log_every_steps == 0 or step == num_steps
            evaluate_now = not stop and (
                step % config.train.eval_every_steps == 0 or step == num_steps
            )
            save = stop or ckpt.should_save(step, num_steps)
            if not (log or evaluate_now or save):
                continue
            if log and not (evaluate_now or save):  # report after the next step's dispatch
                pending = (step, meter.detach(step_counters(state)))
                continue
            if log:
                bad_steps = report(step, meter.detach(step_counters(state)))
            else:
                bad_steps = int(jax.device_get(state.bad_steps))
            if bad_steps >= max_bad_steps:
                raise _diverged(step, bad_steps, max_bad_steps, ckpt)
            if evaluate_now:
                scores = evaluate(
                    task, eval_step, state.params, batch_sharding, config.train.eval_batches
                )
                writer.write(step, scores)
                final.update(scores)
                say(f"step {step}: {format_scores(scores)}")
                meter.restart_clock()
            if save and bad_steps:
                say(
                    f"step {step}: no checkpoint while {bad_steps} step(s) in a row were "
                    "skipped for a non-finite loss or gradient"
                )
            elif save:
                ckpt.save(step, state, feed.get_state())
            if stop:
                ckpt.wait()
                return final, step
    finally:
        progress.close()
    return final, None


def restore_train_state(
    ckpt: Checkpointer, step: int, state: TrainState, shardings: TrainState
) -> tuple[TrainState, dict | None]:
    """(the TrainState saved at `step` placed on `shardings`, the data state); `state` is a
    freshly created state. A checkpoint written before TrainState had the skipped-step counters
    restores with both counters at 0."""
    target = abstract_state(state, shardings)
    try:
        return ckpt.restore(step, target)
    except ValueError as err:
        if "bad_steps" not in str(err):
            raise
    legacy = {name: getattr(target, name) for name in ("step", "params", "opt_state", "rng")}
    restored, data_state = ckpt.restore(step, legacy)
    logging.warning("checkpoint step %d has no skipped-step counters: starting them at 0", step)
    return state.replace(**restored), data_state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns final metrics.

    On a preemption (SIGTERM) it returns after saving a checkpoint of the current step, with
    `preempted_at_step` and the train metrics (no eval metrics, no final_metrics.json)."""
    model_config, scheme = validate_config(config)
    workdir = check_workdir(workdir)
    os.makedirs(workdir, exist_ok=True)

    mesh = sharding.make_mesh(config.mesh.shape.to_dict())
    rules = sharding.logical_rules(config.mesh.get("rules"))
    sharding.check_batch_divisible(config.train.batch_size, mesh)
    batch_sharding = sharding.batch_sharding(mesh)

    task = build_task(config, model_config, scheme)
    num_steps = config.train.num_steps
    tx = make_optimizer(config.optim, num_steps)
    schedule = make_schedule(config.optim, num_steps)
    state, state_shardings = create_train_state(
        task.model, tx, mesh, rules, config.train.seed, task.init_inputs()
    )
    feed = DeviceFeed(
        task.iterator("train", training=True), batch_sharding, config.train.prefetch_batches
    )

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if distributed.is_main_process():
        for name in remove_unfinished_checkpoints(ckpt_dir):
            print(f"Removed unfinished checkpoint {os.path.join(ckpt_dir, name)}", flush=True)
    distributed.sync("unfinished checkpoints removed")
    ckpt = Checkpointer(
        ckpt_dir,
        config.ckpt.every_steps,
        config.ckpt.max_to_keep,
        metadata=checkpoint_metadata(config, mesh),
    )
    start = ckpt.latest_step()
    if start is not None:
        state, data_state = restore_train_state(ckpt, start, state, state_shardings)
        if data_state is not None:
            feed.set_state(data_state)
        logging.info("resumed from %s at step %d", ckpt.directory, start)
        distributed.announce(f"Resuming from checkpoint at step {start} in {ckpt.directory}")
    start = start or 0
    if distributed.is_main_process():  # after the checkpoint accepted this config
        truncate_metrics(workdir, start)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    train_step = jit_train_step(
        task,
        tx,
        schedule,
        state_shardings,
        batch_sharding,
        config.train.max_bad_steps,
        layer_norms=bool(config.train.get("spike_factor", 0.0)),
    )
    eval_step = jit_eval_step(task, state_shardings.params, batch_sharding)

    writer = MetricWriter(workdir)
    final: dict[str, float] = {}
    preempted_at = saved = None
    try:
        if start >= num_steps:
            distributed.announce(f"already trained to train.num_steps={num_steps}; evaluating only")
            final.update(
                evaluate(task, eval_step, state.params, batch_sharding, config.train.eval_batches)
            )
        else:
            with Preemption(ckpt) as preemption:
                metrics, preempted_at = train_loop(
                    config,
                    task,
                    state,
                    train_step,
                    eval_step,
                    feed,
                    batch_sharding,
                    ckpt,
                    writer,
                    start,
                    preemption,
                )
            final.update(metrics)
            saved = ckpt.latest_step()
    finally:
        ckpt.close()
        writer.close()
    if preempted_at is not None:
        if saved == preempted_at:
            distributed.announce(
                f"preempted at step {preempted_at}; checkpoint saved, "
                "rerun the same command to resume"
            )
        else:
            distributed.announce(
                f"preempted at step {preempted_at} during a streak of skipped steps; not "
                f"saved, rerunning the same command resumes from step {saved or 0}"
            )
        train_only = {k: v for k, v in final.items() if not k.startswith("eval/")}
        return {**train_only, "preempted_at_step": float(preempted_at)}
    if distributed.is_main_process():
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=2, sort_keys=True)
    return final
