"""MLX schedulers (runtime.schedulers) against diffusers, step for step.

Every run builds the diffusers scheduler and ours from the same config dict,
walks a full schedule feeding each side its own previous sample back through
a deterministic fake model (so any error accumulates), and asserts the
timesteps are identical and every prev_sample agrees to 1e-6 (scaled by the
sample magnitude where a sampler works at sigma scale, e.g. Euler's ~15).
Stochastic samplers get the exact noise diffusers draws: a second
``torch.Generator`` with the same seed, one ``torch.randn`` per step.
"""

from __future__ import annotations

import inspect

import diffusers
import mlx.core as mx
import numpy as np
import pytest
import torch

from vidport.runtime.schedulers import SCHEDULERS, from_config
from vidport.runtime.schedulers.tables import torch_linspace_f32

TOL = 1e-6
SHAPE = (2, 4, 3, 8, 8)  # (batch, channels, frames, height, width) video latents
STEPS = 25

# stable-diffusion-v1-5/scheduler/scheduler_config.json, as AnimateDiff pipelines load it.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# The DDIM setup of diffusers' AnimateDiff docs / original AnimateDiff inference config.
ANIMATEDIFF_DDIM = {
    **SD15,
    "_class_name": "DDIMScheduler",
    "beta_schedule": "linear",
    "clip_sample": False,
    "steps_offset": 1,
    "timestep_spacing": "linspace",
}
# Wan-AI/Wan2.1-T2V-*-Diffusers/scheduler/scheduler_config.json (flow_shift 3.0 = 480p, 5.0 = 720p).
WAN_UNIPC = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
WAN_FLOW_EULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 5.0}


def _cfg(base: dict, class_name: str, **changes) -> dict:
    return {**base, "_class_name": class_name, **changes}


# name -> (config, options for the run)
CASES = {
    "ddim-animatediff": (ANIMATEDIFF_DDIM, {}),
    "ddim-sd15-scaled_linear-leading": (_cfg(SD15, "DDIMScheduler"), {}),
    "ddim-eta0.5": (_cfg(SD15, "DDIMScheduler"), {"step_kwargs": {"eta": 0.5}, "noisy": True}),
    "ddim-v-trailing-zsnr-clip": (
        _cfg(
            SD15,
            "DDIMScheduler",
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            rescale_betas_zero_snr=True,
            clip_sample=True,
            set_alpha_to_one=True,
        ),
        {},
    ),
    "ddim-squaredcos": (_cfg({}, "DDIMScheduler", beta_schedule="squaredcos_cap_v2"), {}),
    "ddim-trained_betas-sample": (
        _cfg({}, "DDIMScheduler", trained_betas=np.linspace(1e-4, 0.02, 1000).tolist(), prediction_type="sample"),
        {},
    ),
    "euler-sd15": (_cfg(SD15, "EulerDiscreteScheduler"), {}),
    "euler-leading": (_cfg(SD15, "EulerDiscreteScheduler", timestep_spacing="leading"), {}),
    "euler-karras-v-sigma_min": (
        _cfg(
            SD15,
            "EulerDiscreteScheduler",
            use_karras_sigmas=True,
            prediction_type="v_prediction",
            final_sigmas_type="sigma_min",
        ),
        {"float_timesteps_from_sigmas": True},
    ),
    # Zero terminal SNR puts sigma_max at 4096: the first Euler step cancels samples of ~1.4e4 down to
    # ~170, so its own float32 rounding (1 ulp = 1e-3) is carried into unit-scale steps; relative to that
    # first step both sides agree to 7e-8, later steps inherit it (~5e-6 of their operands).
    "euler-zsnr-trailing-v": (
        _cfg(
            SD15,
            "EulerDiscreteScheduler",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            prediction_type="v_prediction",
        ),
        {"tol": 1e-5},
    ),
    "euler_a-sd15": (_cfg(SD15, "EulerAncestralDiscreteScheduler"), {"noisy": True}),
    "euler_a-trailing-v": (
        _cfg(SD15, "EulerAncestralDiscreteScheduler", timestep_spacing="trailing", prediction_type="v_prediction"),
        {"noisy": True},
    ),
    "dpm++2m": (_cfg(SD15, "DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2), {}),
    "dpm++2m-karras": (
        _cfg(SD15, "DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
        {},
    ),
    "dpm++2m-karras-10steps-sigma_min": (
        _cfg(SD15, "DPMSolverMultistepScheduler", use_karras_sigmas=True, final_sigmas_type="sigma_min"),
        {"steps": 10},
    ),
    "dpm++2m-no-lower_order_final-trailing-v": (
        _cfg(
            SD15,
            "DPMSolverMultistepScheduler",
            lower_order_final=False,
            final_sigmas_type="sigma_min",
            timestep_spacing="trailing",
            prediction_type="v_prediction",
        ),
        {"steps": 12},
    ),
    "dpm++2m-karras-cosine-clipped-euler_at_final": (
        _cfg(
            {},
            "DPMSolverMultistepScheduler",
            beta_schedule="squaredcos_cap_v2",
            use_karras_sigmas=True,
            lambda_min_clipped=-5.1,
            euler_at_final=True,
        ),
        {},
    ),
    "dpm++3m-heun": (_cfg(SD15, "DPMSolverMultistepScheduler", solver_order=3, solver_type="heun"), {}),
    "dpm++2m-flow": (
        _cfg(
            {}, "DPMSolverMultistepScheduler", use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
        ),
        {},
    ),
    "flow_euler-shift5": (WAN_FLOW_EULER, {}),
    "flow_euler-shift3-stochastic": (
        _cfg(WAN_FLOW_EULER, "FlowMatchEulerDiscreteScheduler", shift=3.0, stochastic_sampling=True),
        {"noisy": True},
    ),
    "flow_euler-terminal": (
        _cfg(WAN_FLOW_EULER, "FlowMatchEulerDiscreteScheduler", shift=3.0, shift_terminal=0.1),
        {},
    ),
    "flow_euler-dynamic": (
        _cfg(WAN_FLOW_EULER, "FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True),
        {"set_timesteps_kwargs": {"mu": 0.8}},
    ),
    "unipc-wan-shift3": (WAN_UNIPC, {}),
    "unipc-wan-shift5": (_cfg(WAN_UNIPC, "UniPCMultistepScheduler", flow_shift=5.0), {}),
    "unipc-wan-shift5-10steps": (_cfg(WAN_UNIPC, "UniPCMultistepScheduler", flow_shift=5.0), {"steps": 10}),
    "unipc-flow-dynamic-terminal": (
        _cfg(WAN_UNIPC, "UniPCMultistepScheduler", use_dynamic_shifting=True, shift_terminal=0.05),
        {"set_timesteps_kwargs": {"mu": 1.1}},
    ),
    "unipc-flow-karras": (_cfg(WAN_UNIPC, "UniPCMultistepScheduler", use_karras_sigmas=True), {}),
    "unipc-flow-order3": (_cfg(WAN_UNIPC, "UniPCMultistepScheduler", solver_order=3), {}),
    "unipc-sd15-order3-corrector-off": (
        _cfg(SD15, "UniPCMultistepScheduler", solver_order=3, disable_corrector=[0, 5]),
        {},
    ),
    # bh1 and lower_order_final=False need a distinct non-zero final sigma in diffusers (see
    # test_unipc_bh1_zero_final_sigma_is_finite), hence "sigma_min" on the VP schedule.
    "unipc-sd15-bh1-no-lof-sigma_min": (
        _cfg(
            SD15, "UniPCMultistepScheduler", solver_type="bh1", lower_order_final=False, final_sigmas_type="sigma_min"
        ),
        {},
    ),
    # 3rd order up to the very last (largest) step: the phi_k recursion (phi_k = phi_{k-1}/h - 1/k!) cancels
    # in float32 there, so last-ulp differences between torch's sqrt/log (MKL on x86, +-1 ulp) and numpy's
    # correctly rounded ones grow to ~150 ulps of b_3.  Both results are only float32-accurate to that
    # level, hence the looser bound for this case (it reaches ~3e-6).
    "unipc-sd15-order3-no-lof-sigma_min": (
        _cfg(SD15, "UniPCMultistepScheduler", solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
        {"tol": 1e-5},
    ),
    "unipc-sd15-eps-space-karras": (
        _cfg(SD15, "UniPCMultistepScheduler", predict_x0=False, use_karras_sigmas=True, final_sigmas_type="sigma_min"),
        {},
    ),
}


def _target() -> np.ndarray:
    rng = np.random.default_rng(11)
    return (0.8 * np.tanh(rng.standard_normal(SHAPE))).astype(np.float32)


class FakeModel:
    """Deterministic, sample-dependent stand-in for a denoiser, unit-scale and numerically tame.

    For VP schedules it is the ideal denoiser of a fixed target x0 (given the
    model input and t) plus a bounded nonlinear term, in the requested
    parameterisation; for flow schedules a velocity towards the target.  Both
    sides call it on their own samples, so mismatches propagate.
    """

    def __init__(self, ref, prediction_type: str) -> None:
        self.kind = prediction_type
        self.x0 = _target()
        self.alphas_cumprod = ref.alphas_cumprod.numpy().astype(np.float64) if hasattr(ref, "alphas_cumprod") else None

    def __call__(self, x_in: np.ndarray, t: float) -> np.ndarray:
        x = x_in.astype(np.float64)
        wobble = 0.05 * np.sin(3.0 * x + t / 97.0)
        if self.kind == "flow_prediction":
            sigma = min(max(t / 1000.0, 0.02), 1.0)
            noise = (x - (1 - sigma) * self.x0) / sigma
            out = noise - self.x0 + wobble
        else:
            abar = float(np.interp(t, np.arange(len(self.alphas_cumprod)), self.alphas_cumprod))
            abar = min(max(abar, 1e-4), 1 - 1e-4)
            eps = (x - np.sqrt(abar) * self.x0) / np.sqrt(1 - abar) + wobble
            if self.kind == "epsilon":
                out = eps
            elif self.kind == "v_prediction":
                out = np.sqrt(abar) * eps - np.sqrt(1 - abar) * self.x0
            else:
                out = self.x0 + wobble
        return out.astype(np.float32)


def _pair(config: dict):
    ref = getattr(diffusers, config["_class_name"]).from_config(config)
    ours = from_config(config)
    return ref, ours


def _np(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.array(x)


def _err(ref: torch.Tensor, ours: mx.array, *operands: torch.Tensor) -> float:
    """Max abs difference, relative to the largest magnitude among the result and the step's operands
    where that exceeds 1 ("relative to unit-scale samples").

    float32 rounding is relative to the operands: unit-variance latents reach |x| ~ 3.5, and Euler-family
    steps start at sigma_max (~14.6, or 4096 with zero terminal SNR) times that, where one ulp alone
    exceeds 1e-6 and cancels into the much smaller result.  NaN anywhere counts as a mismatch.
    """
    r = ref.numpy().astype(np.float64)
    d = np.abs(r - np.array(ours))
    if not np.isfinite(d).all():
        return float("inf")
    scale = max([1.0, np.abs(r).max()] + [float(op.abs().max()) for op in operands])
    return float(d.max() / scale)


def run_schedule(config: dict, steps: int = STEPS, step_kwargs=None, noisy=False, set_timesteps_kwargs=None, **_):
    """Walk both schedulers over a full schedule; return (ref timesteps, our timesteps, worst step error,
    worst scale_model_input error, final samples)."""
    step_kwargs = step_kwargs or {}
    ref, ours = _pair(config)
    ref.set_timesteps(steps, **(set_timesteps_kwargs or {}))
    ours.set_timesteps(steps, **(set_timesteps_kwargs or {}))
    flow = isinstance(ref, diffusers.FlowMatchEulerDiscreteScheduler)
    model = FakeModel(ref, config.get("prediction_type", "flow_prediction" if flow else "epsilon"))

    start = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    x_ref = torch.from_numpy(start) * getattr(ref, "init_noise_sigma", 1.0)
    x_ours = mx.array(start) * ours.init_noise_sigma
    gen_ref, gen_ours = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)

    worst_step = worst_input = 0.0
    for t_ref, t_ours in zip(ref.timesteps, ours.timesteps):
        # diffusers' flow-match Euler has no scale_model_input (the input is used as is).
        in_ref = ref.scale_model_input(x_ref, t_ref) if hasattr(ref, "scale_model_input") else x_ref
        in_ours = ours.scale_model_input(x_ours, t_ours)
        worst_input = max(worst_input, _err(in_ref, in_ours, x_ref))

        out_ref = model(in_ref.numpy(), float(t_ref))
        out_ours = model(np.array(in_ours), float(t_ours))
        kwargs = dict(step_kwargs)
        noise = None
        if noisy:
            kwargs["generator"] = gen_ref
            noise = mx.array(torch.randn(SHAPE, generator=gen_ours, dtype=torch.float32).numpy())
        x_prev = x_ref
        x_ref = ref.step(torch.from_numpy(out_ref), t_ref, x_ref, **kwargs).prev_sample
        x_ours = ours.step(mx.array(out_ours), t_ours, x_ours, noise=noise, **step_kwargs)
        assert x_ours.dtype == mx.float32 and x_ours.shape == SHAPE
        worst_step = max(worst_step, _err(x_ref, x_ours, x_prev))
    return ref.timesteps.numpy(), ours.timesteps, worst_step, worst_input, (x_ref, x_ours)


@pytest.mark.parametrize("name", list(CASES))
def test_full_schedule_matches_diffusers(name: str) -> None:
    config, opts = CASES[name]
    ts_ref, ts_ours, worst_step, worst_input, (x_ref, x_ours) = run_schedule(config, **opts)

    assert ts_ours.dtype == ts_ref.dtype
    if opts.get("float_timesteps_from_sigmas"):
        # Karras timesteps invert torch's float32 sqrt table, whose last ulp differs from numpy's.
        np.testing.assert_allclose(ts_ours, ts_ref, rtol=1e-6, atol=1e-4)
    else:
        np.testing.assert_array_equal(ts_ours, ts_ref)
    assert np.isfinite(x_ref.numpy()).all() and np.isfinite(np.array(x_ours)).all()
    tol = opts.get("tol", TOL)
    assert worst_input <= tol, f"scale_model_input differs by {worst_input:.3g}"
    assert worst_step <= tol, f"prev_sample differs by {worst_step:.3g}"


@pytest.mark.parametrize(
    "name",
    ["ddim-animatediff", "euler-sd15", "euler-leading", "euler_a-sd15", "dpm++2m-karras", "unipc-wan-shift5"],
)
def test_tables_and_init_noise_sigma(name: str) -> None:
    config, _ = CASES[name]
    ref, ours = _pair(config)
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    ref.set_timesteps(30)
    ours.set_timesteps(30)
    if hasattr(ref, "sigmas") and ref.sigmas is not None:
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=3e-7, atol=0)
    assert abs(float(ours.init_noise_sigma) - float(ref.init_noise_sigma)) <= TOL * max(
        1.0, float(ref.init_noise_sigma)
    )


@pytest.mark.parametrize(
    "start, end", [(0.00085, 0.012), (0.00085**0.5, 0.012**0.5), (0.0001, 0.02), (1.0, 0.5), (0.0, 1.0)]
)
@pytest.mark.parametrize("steps", [2, 3, 37, 1000, 1001])
def test_torch_linspace_emulation(start: float, end: float, steps: int) -> None:
    expected = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
    np.testing.assert_array_equal(torch_linspace_f32(start, end, steps), expected)


ADD_NOISE_CASES = [
    "ddim-animatediff",
    "ddim-v-trailing-zsnr-clip",
    "euler-sd15",
    "euler_a-sd15",
    "dpm++2m-karras",
    "dpm++2m-flow",
    "flow_euler-shift5",
    "unipc-wan-shift3",
    "unipc-sd15-order3-corrector-off",
]


@pytest.mark.parametrize("begin_index", [None, 7])
@pytest.mark.parametrize("name", ADD_NOISE_CASES)
def test_add_noise_matches_diffusers(name: str, begin_index: int | None) -> None:
    """Image-to-video strength: noise a clean latent to one schedule timestep per batch element."""
    config, _ = CASES[name]
    ref, ours = _pair(config)
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    if begin_index is not None:
        if not hasattr(ref, "set_begin_index"):
            pytest.skip("diffusers' DDIM indexes add_noise by timestep only")
        ref.set_begin_index(begin_index)
        ours.set_begin_index(begin_index)
    rng = np.random.default_rng(3)
    original = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    picks = [7, 12]
    t_ref = ref.timesteps[picks]
    t_ours = ours.timesteps[picks]
    if isinstance(ref, diffusers.FlowMatchEulerDiscreteScheduler):
        expected = ref.scale_noise(torch.from_numpy(original), t_ref, torch.from_numpy(noise))
    else:
        expected = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), t_ref)
    got = ours.add_noise(mx.array(original), mx.array(noise), t_ours)
    assert got.shape == SHAPE and got.dtype == mx.float32
    assert _err(expected, got) <= TOL
    # A scalar timestep broadcasts over the batch.
    got_scalar = ours.add_noise(mx.array(original), mx.array(noise), t_ours[0])
    if isinstance(ref, diffusers.FlowMatchEulerDiscreteScheduler):
        exp_scalar = ref.scale_noise(torch.from_numpy(original), t_ref[:1], torch.from_numpy(noise))
    else:
        exp_scalar = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), t_ref[:1])
    assert _err(exp_scalar, got_scalar) <= TOL


def test_img2img_partial_schedule_with_begin_index() -> None:
    """Strength 0.6 the way pipelines run it: add_noise at the first kept timestep, then step from there."""
    config = WAN_UNIPC
    ref, ours = _pair(config)
    ref.set_timesteps(STEPS)
    ours.set_timesteps(STEPS)
    begin = int(STEPS * 0.4)
    ref.set_begin_index(begin)
    ours.set_begin_index(begin)
    model = FakeModel(ref, "flow_prediction")
    rng = np.random.default_rng(9)
    clean, noise = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
    t0 = ref.timesteps[begin : begin + 1]
    x_ref = ref.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), t0)
    x_ours = ours.add_noise(mx.array(clean), mx.array(noise), ours.timesteps[begin])
    assert _err(x_ref, x_ours) <= TOL
    for t_ref, t_ours in zip(ref.timesteps[begin:], ours.timesteps[begin:]):
        x_ref = ref.step(torch.from_numpy(model(x_ref.numpy(), float(t_ref))), t_ref, x_ref).prev_sample
        x_ours = ours.step(mx.array(model(np.array(x_ours), float(t_ours))), t_ours, x_ours)
        assert _err(x_ref, x_ours) <= TOL


def test_from_config_unknown_class_lists_supported() -> None:
    with pytest.raises(ValueError) as info:
        from_config({"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear"})
    message = str(info.value)
    assert "PNDMScheduler" in message
    for name in SCHEDULERS:
        assert name in message
    with pytest.raises(ValueError):
        from_config({"beta_schedule": "linear"})  # no _class_name at all


def test_from_config_class_override_and_foreign_keys() -> None:
    """SD1.5's PNDM config re-used for DDIM (as AnimateDiff does); PNDM-only keys are ignored like diffusers."""
    sched = from_config(SD15, class_name="DDIMScheduler", beta_schedule="linear", timestep_spacing="linspace")
    assert type(sched).__name__ == "DDIMScheduler"
    assert sched.config["beta_schedule"] == "linear" and sched.config["steps_offset"] == 1
    assert "skip_prk_steps" not in sched.config
    # Options that only parameterise an unsupported feature are accepted with any value ...
    from_config(_cfg(SD15, "DDIMScheduler", dynamic_thresholding_ratio=0.9, sample_max_value=2.0))
    # ... but a misspelt keyword override is an error, not a silent no-op.
    with pytest.raises(ValueError, match="flow_shfit"):
        from_config(WAN_UNIPC, flow_shfit=5.0)


@pytest.mark.parametrize(
    "config, option",
    [
        (_cfg(SD15, "DDIMScheduler", thresholding=True), "thresholding"),
        (_cfg(SD15, "EulerDiscreteScheduler", interpolation_type="log_linear"), "interpolation_type"),
        (_cfg(SD15, "DPMSolverMultistepScheduler", use_lu_lambdas=True), "use_lu_lambdas"),
        (_cfg(WAN_UNIPC, "UniPCMultistepScheduler", use_exponential_sigmas=True), "use_exponential_sigmas"),
        (_cfg(WAN_FLOW_EULER, "FlowMatchEulerDiscreteScheduler", invert_sigmas=True), "invert_sigmas"),
    ],
)
def test_from_config_rejects_unsupported_option(config: dict, option: str) -> None:
    with pytest.raises(ValueError, match=option):
        from_config(config)


@pytest.mark.parametrize(
    "config",
    [
        _cfg(SD15, "DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"),
        _cfg(SD15, "DDIMScheduler", beta_schedule="sigmoid"),
        _cfg(SD15, "EulerDiscreteScheduler", timestep_spacing="karras"),
    ],
)
def test_unsupported_values_of_supported_options_raise(config: dict) -> None:
    with pytest.raises(ValueError):
        from_config(config)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_options_cover_diffusers_signature_with_same_defaults(name: str) -> None:
    """Every diffusers option is implemented (same default), rejected unless at its default, or inert
    (only parameterises an unsupported feature) -- so a new diffusers option fails here first."""
    cls = SCHEDULERS[name]
    theirs = {
        n: p.default for n, p in inspect.signature(getattr(diffusers, name).__init__).parameters.items() if n != "self"
    }
    ours = cls.supported_options()
    groups = [set(ours), set(cls.unsupported), set(cls.inert)]
    assert set().union(*groups) == set(theirs)
    assert sum(len(g) for g in groups) == len(theirs), "an option is listed twice"
    for key, default in {**ours, **cls.unsupported}.items():
        expected = theirs[key]
        if isinstance(expected, (list, tuple)) or isinstance(default, (list, tuple)):
            assert list(default) == list(expected), key
        elif isinstance(expected, float) and np.isinf(expected):
            assert default == expected, key
        else:
            assert default == expected, key


def test_unipc_bh1_zero_final_sigma_is_finite() -> None:
    """Documented divergence: with bh1 and a zero final sigma diffusers' last step computes -inf * 0 = NaN
    (B(h) = -h is infinite, the empty correction term is 0); we skip the empty term and land on x0."""
    config = _cfg(WAN_UNIPC, "UniPCMultistepScheduler", solver_type="bh1")
    ref, ours = _pair(config)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    model = FakeModel(ref, "flow_prediction")
    x_ref = torch.from_numpy(np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32))
    x_ours = mx.array(x_ref.numpy())
    for i, (t_ref, t_ours) in enumerate(zip(ref.timesteps, ours.timesteps)):
        x_ref = ref.step(torch.from_numpy(model(x_ref.numpy(), float(t_ref))), t_ref, x_ref).prev_sample
        x_ours = ours.step(mx.array(model(np.array(x_ours), float(t_ours))), t_ours, x_ours)
        if i < len(ref.timesteps) - 1:
            assert _err(x_ref, x_ours) <= TOL
    assert torch.isnan(x_ref).all()
    # The last step (order 1, sigma 0) returns the data prediction diffusers stored for it.
    assert _err(ref.model_outputs[-1], x_ours) <= TOL


@pytest.mark.parametrize("name", ["euler_a-sd15", "flow_euler-shift3-stochastic"])
def test_stochastic_step_requires_noise(name: str) -> None:
    _, ours = _pair(CASES[name][0])
    ours.set_timesteps(5)
    sample = mx.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        ours.step(sample, ours.timesteps[0], sample)
