"""What a training job declares, so that one line in the table (:data:`trainers.jobs.JOBS`) gives it
a ``moray train <name>`` command, a ``moray config <name>`` listing and its dispatch.

A job is one file in ``trainers/jobs/``: its config (a :class:`~trainers.job_config.JobConfig`), its
task (a :class:`~trainers.task.Task`), its ``run`` (checks before Ray starts, then
:func:`trainers.launch.train_on_rows`), and a :class:`Job` naming them with its own flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from trainers.core.config import load_config, parse_dotted
from trainers.job_config import JobConfig
from trainers.losses import LOSSES


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config field (``key``, dotted). ``help`` defaults to the
    field's own documentation; ``type`` is argparse's (``int``, ``float``); ``parse`` turns the text
    into the field's value when the config is built, so its errors read as Moray's (e.g.
    ``parse_numbers`` for ``a=0.7,b=0.3``); ``switch``: a flag without a value that sets True."""

    flag: str
    key: str
    type: Callable[[str], Any] = str
    choices: Optional[Tuple[Any, ...]] = None
    parse: Optional[Callable[[str], Any]] = None
    switch: bool = False
    help: str = ""

    @property
    def dest(self) -> str:
        """Its attribute on the parsed command line: ``--zero-stage`` -> ``zero_stage``."""
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Job:
    """A training job: ``moray train <name>``."""

    name: str
    help: str
    config: type                                   # its JobConfig subclass
    task: Callable[[Any], Any]                     # config -> the Task the loop trains
    run: Callable[[JobConfig], Dict[str, Any]]     # run(config) -> final metrics
    flags: Tuple[Flag, ...] = ()


# the flags every job takes
COMMON_FLAGS: Tuple[Flag, ...] = (
    Flag("--objective", "objective"), Flag("--data", "data.path"), Flag("--model", "model.name_or_path"),
    Flag("--out", "out"), Flag("--workers", "train.workers", int), Flag("--zero-stage", "train.zero_stage", int, (0, 1, 2, 3)),
    Flag("--lora", "model.lora", switch=True), Flag("--loss", "train.loss", choices=tuple(LOSSES)),
    Flag("--beta", "train.beta", float), Flag("--lr", "train.lr", float), Flag("--epochs", "train.epochs", int),
    Flag("--micro-batch-size", "train.micro_batch_size", int), Flag("--grad-accum", "train.grad_accum", int),
    Flag("--use-gpu", "train.use_gpu", switch=True), Flag("--seed", "train.seed", int),
    Flag("--max-failures", "train.max_failures", int), Flag("--address", "address"),
)


class PromiseUnmet(RuntimeError):
    """A job ran to the end and exported its result, but missed what it promised (e.g. MOPO's
    constraints); ``moray`` exits 1 with the message."""


def config_from(job: Job, path: Optional[str], args: Any, overrides: Sequence[str] = ()) -> Any:
    """A job's config: defaults, then the YAML file at ``path``, then the job's flags as parsed in
    ``args`` (None: not given), then ``--set`` ``overrides`` (``KEY=VALUE``)."""
    given: Dict[str, Any] = {}
    for f in flags_of(job):
        value = getattr(args, f.dest, None)
        if value is not None:
            given[f.key] = f.parse(value) if f.parse else value
    given.update(parse_dotted(list(overrides)))
    return load_config(job.config, path, given)


def flags_of(job: Job) -> List[Flag]:
    return [*COMMON_FLAGS, *job.flags]
