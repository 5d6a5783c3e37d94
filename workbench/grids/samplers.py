"""A1111 sampler and schedule-type names mapped to diffusers schedulers.

A1111 (since 1.9) keeps the sampler (`Sampler: DPM++ 2M`) and the schedule type (`Schedule type:
Karras`) apart. "Automatic" means the sampler's own default: Karras for DPM++ 2M, DPM++ SDE, DPM2 and
DPM2 a, Exponential for DPM++ 2M SDE, and the model's uniform sigmas for the others. Users type
wb's short keys (`euler_a`, `karras`) or A1111's names (`Euler a`, `Karras`), any case; the old
combined names (`dpm++2m_karras`, `DPM++ 2M Karras`) are split as A1111 splits them. PNG info carries
A1111's names. Every scheduler is built from the pipeline's own scheduler config, so the model's
noise schedule and prediction type carry over.
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
    default_schedule: str | None = None  # A1111's "Automatic" for this sampler (None: uniform)
    timesteps: bool = False  # A1111 samples it on timesteps: its schedule type is ignored
    # The sigma options its diffusers scheduler takes (checked against diffusers in the tests), so a
    # plan can refuse a pair without importing diffusers.
    sigma_options: frozenset = frozenset({"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"})
    aliases: tuple[str, ...] = ()  # A1111's aliases (its API takes them too)


@dataclass(frozen=True)
class Schedule:
    key: str  # A1111's name (sd_schedulers.py)
    label: str  # what A1111 writes after "Schedule type: "
    options: dict = field(default_factory=dict)  # diffusers scheduler options


_ALL = (
    Sampler("euler", "Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    Sampler("euler_a", "Euler a", "EulerAncestralDiscreteScheduler", ancestral=True,
            sigma_options=frozenset(), aliases=("k_euler_a", "k_euler_ancestral")),  # fmt: skip
    Sampler("dpm++2m", "DPM++ 2M", "DPMSolverMultistepScheduler", default_schedule="karras",
            aliases=("k_dpmpp_2m",)),  # fmt: skip
    Sampler("dpm++sde", "DPM++ SDE", "DPMSolverSDEScheduler", needs="torchsde", ancestral=True,
            default_schedule="karras"),  # fmt: skip
    Sampler("dpm++2m_sde", "DPM++ 2M SDE", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++"}, ancestral=True,
            default_schedule="exponential"),  # fmt: skip
    Sampler("dpm2", "DPM2", "KDPM2DiscreteScheduler", default_schedule="karras", aliases=("k_dpm_2",)),
    Sampler("dpm2_a", "DPM2 a", "KDPM2AncestralDiscreteScheduler", ancestral=True,
            default_schedule="karras", aliases=("k_dpm_2_a",)),  # fmt: skip
    Sampler("ddim", "DDIM", "DDIMScheduler", timesteps=True),
    Sampler("pndm", "PLMS", "PNDMScheduler", {"skip_prk_steps": True}, timesteps=True),
    Sampler("unipc", "UniPC", "UniPCMultistepScheduler", timesteps=True),
    Sampler("heun", "Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
    Sampler("lms", "LMS", "LMSDiscreteScheduler", needs="scipy", aliases=("k_lms",)),
)

# A1111's schedule types that diffusers can follow. Every one spaces the timesteps over the whole
# training range first (A1111 takes sigma_min and sigma_max from the model), then shapes the sigmas.
_LINSPACE = {"timestep_spacing": "linspace"}
SCHEDULES = (
    Schedule("automatic", "Automatic"),
    Schedule("uniform", "Uniform", dict(_LINSPACE)),
    Schedule("karras", "Karras", {**_LINSPACE, "use_karras_sigmas": True}),
    Schedule("exponential", "Exponential", {**_LINSPACE, "use_exponential_sigmas": True}),
    Schedule("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}),
    Schedule("beta", "Beta", {**_LINSPACE, "use_beta_sigmas": True}),
    Schedule("ddim", "DDIM", {"timestep_spacing": "leading"}),
)
_SCHEDULE_ALIASES = {"sgmuniform": "sgm_uniform"}


def available() -> dict[str, Sampler]:
    """The samplers this environment can run (dpm++sde needs torchsde, lms scipy), keyed by short name."""
    return {s.key: s for s in _ALL if s.needs is None or importlib.util.find_spec(s.needs) is not None}


def _normal(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def resolve_schedule(name: str) -> Schedule:
    """A schedule type by A1111 name or label (any case). WorkbenchError otherwise."""
    wanted = _normal(name)
    wanted = _SCHEDULE_ALIASES.get(wanted, wanted)
    for s in SCHEDULES:
        if wanted in (s.key, _normal(s.label)):
            return s
    raise WorkbenchError(
        f"--scheduler {name!r}: unknown schedule type; known: {', '.join(s.key for s in SCHEDULES)}"
    )


def split_sampler(name: str) -> tuple[Sampler, Schedule | None]:
    """A sampler name and the schedule type it names, as A1111 splits "DPM++ 2M Karras"."""
    wanted = _normal(name)
    for s in _ALL:
        if wanted in (s.key, _normal(s.display), *s.aliases):
            return _usable(s, name), None
    for schedule in SCHEDULES[1:]:
        for suffix in {schedule.key, _normal(schedule.label)}:
            if wanted.endswith("_" + suffix):
                head = wanted[: -len(suffix) - 1]
                for s in _ALL:
                    if head in (s.key, _normal(s.display)):
                        return _usable(s, name), schedule
    raise WorkbenchError(f"--sampler {name!r}: unknown sampler; known: {', '.join(available())}")


def _usable(s: Sampler, name: str) -> Sampler:
    if s not in available().values():
        raise WorkbenchError(f"--sampler {name}: needs the {s.needs} package (pip install {s.needs})")
    return s


def resolve(name: str) -> Sampler:
    """The sampler for a short key or an A1111 name (any case; a schedule suffix is split off)."""
    return split_sampler(name)[0]


def effective_schedule(sampler: Sampler, schedule: Schedule) -> Schedule:
    """The schedule a sampler runs with: "Automatic" becomes the sampler's default, as in A1111."""
    if schedule.key == "automatic" and sampler.default_schedule and not sampler.timesteps:
        return resolve_schedule(sampler.default_schedule)
    return schedule


def schedule_label(sampler: Sampler, schedule: Schedule) -> str:
    """What A1111 writes after "Schedule type: " for this sampler and requested schedule."""
    return effective_schedule(sampler, schedule).label


def scheduler_options(sampler: Sampler, schedule: Schedule) -> dict:
    """The diffusers options for a sampler under a schedule type. WorkbenchError when diffusers'
    scheduler for that sampler cannot follow it."""
    options = dict(sampler.options)
    if sampler.timesteps:  # A1111 ignores the schedule type of DDIM, PLMS and UniPC; so does wb
        return options
    effective = effective_schedule(sampler, schedule)
    if effective.key == "automatic":
        effective = resolve_schedule("uniform")
    missing = [k for k in effective.options if k != "timestep_spacing" and k not in sampler.sigma_options]
    if missing:
        raise WorkbenchError(
            f"--scheduler {effective.key}: diffusers' {sampler.scheduler} (sampler {sampler.display}) "
            f"has no {', '.join(missing)}; pick another schedule type or sampler"
        )
    return {**options, **effective.options}


def make_scheduler(sampler: Sampler, base_config: dict, schedule: Schedule | None = None):
    """A fresh diffusers scheduler for `sampler` under `schedule` (default Automatic), configured from
    the pipeline's scheduler config."""
    from diffusers import schedulers

    cls = getattr(schedulers, sampler.scheduler)
    options = scheduler_options(sampler, schedule or SCHEDULES[0])
    return cls.from_config(dict(base_config), **options)
