"""Optax chains and learning-rate schedules from `config.optim`.

Schedules (peak `optim.learning_rate`, `optim.warmup_steps` of linear warmup from 0):
- cosine: then cosine decay to `optim.end_lr_factor` x peak at `train.num_steps`;
- linear: then linear decay to `optim.end_lr_factor` x peak;
- constant: then constant;
- inverse_sqrt: then peak * sqrt(warmup / step) (Vaswani et al. 2017, sec. 5.3).
Optimizer: gradient clipping by global norm (`optim.clip_norm`, 0 = off), then AdamW with decoupled
weight decay (Loshchilov & Hutter 2019) applied to matrices only (not to biases, norm gains).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from deepscale_jax.validation import check_choice, check_int, check_number

SCHEDULES = ("cosine", "linear", "constant", "inverse_sqrt")


def validate_optim(optim: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first bad `optim.*` field and what would be accepted."""
    check_choice(optim.get("schedule"), "optim.schedule", SCHEDULES)
    check_number(optim.get("learning_rate"), "optim.learning_rate", 0, low_open=True)
    check_int(optim.get("warmup_steps"), "optim.warmup_steps", minimum=0)
    check_number(optim.get("end_lr_factor"), "optim.end_lr_factor", 0, 1)
    check_number(optim.get("b1"), "optim.b1", 0, 1, high_open=True)
    check_number(optim.get("b2"), "optim.b2", 0, 1, high_open=True)
    check_number(optim.get("eps"), "optim.eps", 0, low_open=True)
    check_number(optim.get("weight_decay"), "optim.weight_decay", 0)
    check_number(optim.get("clip_norm"), "optim.clip_norm", 0)  # 0 = no clipping


def make_schedule(optim: Mapping[str, Any], num_steps: int) -> optax.Schedule:
    peak = float(optim["learning_rate"])
    warmup = int(optim["warmup_steps"])
    end = peak * float(optim["end_lr_factor"])
    name = optim["schedule"]
    decay_steps = max(num_steps - warmup, 1)
    if name == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif name == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif name == "constant":
        after = optax.constant_schedule(peak)
    elif name == "inverse_sqrt":
        w = max(warmup, 1)
        after = lambda count: peak * jnp.sqrt(w / (count + w))
    else:
        raise ValueError(f"unknown optim.schedule={name!r}; accepted: {', '.join(SCHEDULES)}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


DECAYED_PARAMS = ("kernel", "embedding")


def decay_mask(params: Any) -> Any:
    """True for weight matrices and embedding tables, by name (so the scan layout does not matter:
    a scanned bias is 2-D but must not decay)."""

    def is_decayed(path: tuple, _: Any) -> bool:
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) in DECAYED_PARAMS

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(optim: Mapping[str, Any], num_steps: int) -> optax.GradientTransformation:
    schedule = make_schedule(optim, num_steps)
    parts = []
    if float(optim["clip_norm"]) > 0:
        parts.append(optax.clip_by_global_norm(float(optim["clip_norm"])))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optim["b1"]),
            b2=float(optim["b2"]),
            eps=float(optim["eps"]),
            weight_decay=float(optim["weight_decay"]),
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
