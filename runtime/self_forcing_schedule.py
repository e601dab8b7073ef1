"""The few-step schedule of Self-Forcing (and CausVid) inference, as the official
`CausalInferencePipeline` runs it on its `FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)`
set to 1000 training timesteps:

- the 1000 sigmas are 1, 0.999, ..., 0.001 (a linspace to 0 with the 0 dropped), shifted by
  sigma' = shift * s / (1 + (shift - 1) * s); timestep = 1000 * sigma';
- the denoising list [1000, 750, 500, 250] is "warped": entry k becomes the timestep at index
  1000 - k, so with shift 5 the model sees 1000, 937.5, 833.3, 625;
- at each of those the DiT predicts the flow; x0 = x_t - sigma_t * flow (in float64, cast back);
- between steps x0 is noised again to the next timestep with fresh noise:
  x = (1 - sigma_next) * x0 + sigma_next * noise; after the last, x0 is the block's result.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 5.0  # the released configs' timestep_shift
DEFAULT_STEPS = 4  # [1000, 750, 500, 250]


def denoising_list(steps: int) -> list[int]:
    """The official list for 4 steps, [1000, 750, 500, 250]; other counts evenly spaced the same way."""
    if steps < 1 or steps > TRAIN_TIMESTEPS:
        raise ValueError(f"{steps} steps: between 1 and {TRAIN_TIMESTEPS}")
    return [round(TRAIN_TIMESTEPS * (steps - i) / steps) for i in range(steps)]


def shifted_sigma(k: int | np.ndarray, shift: float) -> np.ndarray:
    """The sigma at the warped position of list entry k (index 1000 - k of the 1000 sigmas), float32."""
    s = np.asarray(k, np.float64) / TRAIN_TIMESTEPS
    return (shift * s / (1 + (shift - 1) * s)).astype(np.float32)


@dataclass(frozen=True)
class FewStepSchedule:
    """Per denoising step: the timestep the DiT sees and the sigma it stands for."""

    sigmas: tuple[float, ...]
    shift: float

    @classmethod
    def official(cls, steps: int = DEFAULT_STEPS, shift: float = DEFAULT_SHIFT) -> "FewStepSchedule":
        return cls(tuple(float(s) for s in shifted_sigma(np.array(denoising_list(steps)), shift)), shift)

    @property
    def timesteps(self) -> list[float]:
        return [float(np.float32(s) * np.float32(TRAIN_TIMESTEPS)) for s in self.sigmas]

    def __len__(self) -> int:
        return len(self.sigmas)

    def x0(self, latents: np.ndarray, flow: np.ndarray, step: int) -> np.ndarray:
        """The clean latents the flow prediction at `step` implies (float64 math, as the official)."""
        return (np.asarray(latents, np.float64) - self.sigmas[step] * np.asarray(flow, np.float64)).astype(latents.dtype)

    def renoise(self, x0: np.ndarray, noise: np.ndarray, step: int) -> np.ndarray:
        """x0 noised to the timestep of `step` (the next step's input)."""
        sigma = np.float32(self.sigmas[step])
        return ((1 - sigma) * x0 + sigma * noise).astype(x0.dtype)
