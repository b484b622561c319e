"""Sizing the half-precision tests to the CPU.

A CPU without native bf16/fp16 matrix units (no ``avx512_bf16``/``amx_bf16``, no
``avx512_fp16``; e.g. an AMD EPYC with avx, fma and f16c only) multiplies bf16 and
fp16 matrices about 65 times slower than float32 (one thread, 64x576 @ 576x1536:
float32 71.5 GFLOP/s, bf16 1.1, fp16 1.2), so running the whole SmolLM2 model in half
precision takes tens of minutes there. :func:`measure_rates` times that matmul per
dtype (a fraction of a second); :class:`HalfPlan` calls a half dtype *emulated* when
its rate is below ``EMULATED_BELOW`` of float32's, and the end-to-end half tests then
run on :func:`truncated_copy` of the model (the same checks, few layers above the edit
window). ``EASYEDIT_REPLAY_TEST_HALF`` (``auto``, the default; ``reduced``; ``full``)
forces the path.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch

ENV_VAR = "EASYEDIT_REPLAY_TEST_HALF"
CHOICES = ("auto", "reduced", "full")
EMULATED_BELOW = 0.1  # half-precision GFLOP/s relative to float32's
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
RATE_SHAPE = (64, 576, 1536)  # SmolLM2-135M: 64 tokens through an MLP up-projection
REDUCED_ABOVE = 2  # half-precision decoder layers that a reduced copy keeps above the edit window


def matmul_gflops(dtype: torch.dtype, shape=RATE_SHAPE, seconds: float = 0.05) -> float:
    """GFLOP/s of one CPU thread multiplying ``[m, k] @ [k, n]`` matrices of ``dtype``.

    One warm-up product, then products until ``seconds`` have passed (at least one),
    counted as ``2 m k n`` floating-point operations each. The thread count is set to 1
    for the measurement and restored afterwards.
    """
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a @ b
        reps, start = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    finally:
        torch.set_num_threads(threads)
    return 2.0 * m * k * n * reps / elapsed / 1e9


def measure_rates(seconds: float = 0.05) -> Dict[str, float]:
    """``{"float32": .., "bfloat16": .., "float16": ..}`` GFLOP/s of :func:`matmul_gflops`."""
    return {name: matmul_gflops(dtype, seconds=seconds)
            for name, dtype in {"float32": torch.float32, **HALF}.items()}


def half_choice(environ: Optional[Mapping[str, str]] = None) -> str:
    """``EASYEDIT_REPLAY_TEST_HALF`` (default ``auto``), lower-cased.

    Raises:
        ValueError: a value other than ``auto``, ``reduced`` or ``full``.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={environ[ENV_VAR]!r}: must be one of {', '.join(CHOICES)} (auto: decided by "
                         f"the CPU's measured half-precision matmul rate; unset it or pick one)")
    return value


@dataclass(frozen=True)
class HalfPlan:
    """Which path the end-to-end half-precision tests take, per half dtype.

    Attributes:
        rates: GFLOP/s per dtype name (``float32``, ``bfloat16``, ``float16``), from
            :func:`measure_rates`.
        choice: ``auto`` (reduced where the dtype is emulated), ``reduced`` or ``full``.
    """

    rates: Dict[str, float]
    choice: str = "auto"

    def emulated(self, name: str) -> bool:
        """Whether half dtype ``name`` multiplies below ``EMULATED_BELOW`` of float32's rate."""
        return self.rates[name] < EMULATED_BELOW * self.rates["float32"]

    def reduced(self, name: str) -> bool:
        """Whether the tests of half dtype ``name`` run on the truncated copy."""
        return self.choice == "reduced" or (self.choice == "auto" and self.emulated(name))

    def reason(self, name: str) -> str:
        """One line: the path of ``name``, the measured rates and what decided it."""
        ratio = self.rates[name] / self.rates["float32"]
        measured = (f"{name} {self.rates[name]:.1f} GFLOP/s vs float32 {self.rates['float32']:.1f} GFLOP/s "
                    f"(x{ratio:.3g}; emulated below x{EMULATED_BELOW:g}) on one thread, "
                    f"{'x'.join(map(str, RATE_SHAPE[:2]))} @ {'x'.join(map(str, RATE_SHAPE[1:]))}")
        why = f"forced by {ENV_VAR}={self.choice}" if self.choice != "auto" else \
            ("emulated" if self.emulated(name) else "native")
        path = "reduced (truncated copy of the model)" if self.reduced(name) else "full model"
        return f"{name}: {path}, {why}: {measured}"


def truncated_copy(model, n_layers: int):
    """A deep copy of a Llama-style causal LM that keeps decoder layers ``0 .. n_layers - 1``
    (``model.model.layers``), the final norm and the (tied) head: the real model's first
    ``n_layers`` blocks, bit-identical, read out as if they were the whole stack.
    ``config.num_hidden_layers`` (and ``layer_types`` where present) are cut to match;
    ``model`` is not changed.

    Raises:
        ValueError: ``n_layers`` outside ``1 .. len(model.model.layers)``.
    """
    layers = model.model.layers
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"n_layers={n_layers}: must be between 1 and the model's {len(layers)} decoder layers")
    kept = torch.nn.ModuleList(list(layers)[:n_layers])
    model.model.layers = kept  # only the kept layers are copied
    try:
        out = copy.deepcopy(model)
    finally:
        model.model.layers = layers
    out.config.num_hidden_layers = n_layers
    if isinstance(getattr(out.config, "layer_types", None), list):
        out.config.layer_types = out.config.layer_types[:n_layers]
    return out


def reduced_copy(model, layers, above: int = REDUCED_ABOVE):
    """``(copy, hparams changes)`` for an edit of decoder layers ``layers`` on the reduced path:
    :func:`truncated_copy` keeping the float32 edit window ``l_1 .. l_n + 1``
    (:mod:`easyedit_replay.precision`) and ``above`` layers above it, and
    ``{"v_loss_layer": its last layer}`` (the anchor's loss layer must exist in the copy).

    Raises:
        ValueError: the window and ``above`` need more layers than the model has.
    """
    n = max(layers) + 2 + above
    return truncated_copy(model, n), {"v_loss_layer": n - 1}
