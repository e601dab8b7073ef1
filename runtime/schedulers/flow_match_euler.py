"""Flow-matching Euler (rectified flow): x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v.

The schedule is x_t = (1 - sigma) x0 + sigma eps with sigma shifted towards
noise by ``shift`` (Wan uses 3.0 at 480p, 5.0 at 720p).  Reproduces
``diffusers.FlowMatchEulerDiscreteScheduler``, including its float32 train
table whose shifted end points seed the inference linspace.
"""

from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from . import tables
from .base import F32, Scheduler, as_f32, per_batch


class FlowMatchEulerDiscreteScheduler(Scheduler):
    """Euler ODE steps on the velocity field; ``stochastic_sampling`` re-noises with caller ``noise``."""

    diffusers_name = "FlowMatchEulerDiscreteScheduler"
    unsupported = {
        "invert_sigmas": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }

    def __init__(
        self,
        *,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        shift_terminal: float | None = None,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ) -> None:
        self._store_config(locals())
        self._check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
        n = num_train_timesteps
        timesteps = np.linspace(1, n, n, dtype=F32)[::-1].copy()
        sigmas = timesteps / F32(n)
        if not use_dynamic_shifting:
            shift32 = F32(shift)
            sigmas = shift32 * sigmas / (F32(1) + F32(shift - 1) * sigmas)
        self.timesteps = sigmas * F32(n)
        self.sigmas = sigmas
        self._shift = shift
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._reset_step_state()

    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Change the static shift used by later ``set_timesteps`` calls."""
        self._shift = shift

    def set_timesteps(self, num_inference_steps: int | None = None, mu: float | None = None,
                      sigmas: Sequence[float] | None = None) -> None:
        """Evenly spaced t between the (shifted) train end points, or the given ``sigmas`` (LTX-2's
        pipelines pass them), shifted; ``mu`` for dynamic shifting."""
        cfg = self.config
        n_train = cfg["num_train_timesteps"]
        if cfg["use_dynamic_shifting"] and mu is None:
            raise ValueError("`mu` must be passed to set_timesteps when use_dynamic_shifting=True")
        if sigmas is None:
            timesteps = np.linspace(self.sigma_max * n_train, self.sigma_min * n_train, num_inference_steps)
            sigmas = timesteps / n_train
        else:
            sigmas = np.asarray(sigmas, dtype=F32)
        self.num_inference_steps = len(sigmas)
        if cfg["use_dynamic_shifting"]:
            sigmas = tables.time_shift(cfg["time_shift_type"], mu, sigmas)
        else:
            sigmas = tables.shift_sigmas(sigmas, self.shift)
        if cfg["shift_terminal"]:
            sigmas = tables.stretch_to_terminal(sigmas, cfg["shift_terminal"])
        sigmas = sigmas.astype(F32)
        self.timesteps = sigmas * F32(n_train)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, F32)])
        self._reset_step_state()

    def step(self, model_output: mx.array, t: Any, sample: mx.array, noise: mx.array | None = None) -> mx.array:
        """Euler step along the predicted velocity; with ``stochastic_sampling`` jump to x0 and re-noise
        to sigma_next using ``noise`` (required then)."""
        stochastic = self.config["stochastic_sampling"]
        if stochastic and noise is None:
            raise ValueError("stochastic_sampling=True: step needs `noise` (standard normal, sample's shape)")
        self._init_step_index(t)
        model_output, sample = as_f32(model_output), as_f32(sample)
        sigma = self.sigmas[self._step_index]
        sigma_next = self.sigmas[self._step_index + 1]
        self._step_index += 1
        if stochastic:
            x0 = sample - float(sigma) * model_output
            return float(F32(1) - sigma_next) * x0 + float(sigma_next) * as_f32(noise)
        return sample + float(sigma_next - sigma) * model_output

    def add_noise(self, original: mx.array, noise: mx.array, t: Any) -> mx.array:
        """x_t = sigma eps + (1 - sigma) x0 (diffusers' ``scale_noise(sample, t, noise)``)."""
        sigma = self.sigmas[self._noise_step_indices(t)]
        keep = per_batch(F32(1) - sigma, original.ndim)
        return per_batch(sigma, original.ndim) * as_f32(noise) + keep * as_f32(original)
