"""A1111 sampler names mapped to diffusers schedulers.

Users type the short keys (`euler_a`) or A1111's display names (`Euler a`); PNG info carries the
display name, as A1111 writes it. Every scheduler is built from the pipeline's own scheduler
config, so the model's noise schedule and prediction type carry over.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class Sampler:
    key: str
    display: str  # what A1111 writes after "Sampler: "
    scheduler: str  # diffusers class name
    options: dict = field(default_factory=dict)
    needs: str | None = None  # an optional module the scheduler imports
    ancestral: bool = False  # draws fresh noise every step from the generator


_ALL = (
    Sampler("euler", "Euler", "EulerDiscreteScheduler"),
    Sampler("euler_a", "Euler a", "EulerAncestralDiscreteScheduler", ancestral=True),
    Sampler("dpm++2m", "DPM++ 2M", "DPMSolverMultistepScheduler"),
    Sampler("dpm++2m_karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    Sampler("dpm++sde", "DPM++ SDE", "DPMSolverSDEScheduler", needs="torchsde", ancestral=True),
    Sampler("dpm2", "DPM2", "KDPM2DiscreteScheduler"),
    Sampler("dpm2_a", "DPM2 a", "KDPM2AncestralDiscreteScheduler", ancestral=True),
    Sampler("ddim", "DDIM", "DDIMScheduler"),
    Sampler("pndm", "PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    Sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
    Sampler("heun", "Heun", "HeunDiscreteScheduler"),
    Sampler("lms", "LMS", "LMSDiscreteScheduler", needs="scipy"),
)


def available() -> dict[str, Sampler]:
    """The samplers this environment can run (dpm++sde needs torchsde, lms scipy), keyed by short name."""
    return {s.key: s for s in _ALL if s.needs is None or importlib.util.find_spec(s.needs) is not None}


def _normal(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def resolve(name: str) -> Sampler:
    """The sampler for a short key or an A1111 display name (any case). WorkbenchError otherwise."""
    wanted = _normal(name)
    for s in _ALL:
        if wanted in (s.key, _normal(s.display)):
            if s not in available().values():
                raise WorkbenchError(f"--sampler {name}: needs the {s.needs} package (pip install {s.needs})")
            return s
    raise WorkbenchError(f"--sampler {name!r}: unknown sampler; known: {', '.join(available())}")


def make_scheduler(sampler: Sampler, base_config: dict):
    """A fresh diffusers scheduler for `sampler`, configured from the pipeline's scheduler config."""
    from diffusers import schedulers

    cls = getattr(schedulers, sampler.scheduler)
    return cls.from_config(dict(base_config), **sampler.options)
