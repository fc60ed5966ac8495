"""How studies are processed: when one is complete, the task queue, the models, what they take."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from agent.settings.base import Pattern, _Section

# A model's switch: run it, hold its studies, or do not run it at all.
ModelState = Literal["on", "paused", "off"]


class StudySettings(_Section):
    quiet_seconds: Annotated[float, Field(gt=0)] = 30.0
    # A study pushed by a sender that a [[sources]] entry lists in calling_ae_titles is checked
    # against that source (its NumberOfStudyRelatedInstances) after this many quiet seconds,
    # then again after twice, four times as many, ...; it starts as soon as the counts match.
    verify_after_seconds: Annotated[float, Field(gt=0)] = 2.0
    # A study whose delivery was cut short in its last quiet period (an association aborted or
    # dropped, an instance refused with 0xA7xx Out of Resources; a STOW-RS request cut off or
    # with such a refusal) is not sealed on the quiet period: it waits this long for the sender
    # to send again, then is sealed with a note that its input may be partial.
    sender_retry_seconds: Annotated[float, Field(ge=0)] = 300.0
    # A study still receiving this long after it opened (a sender that trickles instances
    # just inside the quiet period) is sealed anyway, with a note; later instances reopen it.
    max_wait_seconds: Annotated[float, Field(gt=0)] = 3600.0


class QueueSettings(_Section):
    broker_url: str = "memory://"
    # Hard limit for one task; Redis's visibility timeout is set above it so that a task still
    # running is never handed to a second worker.
    task_time_limit_seconds: Annotated[int, Field(ge=10)] = 1800
    # Retries of inference (a worker without its GPU, a volume read that failed) and of the
    # steps of an export before it sends; sending retries per destination, see [[destinations]].
    max_retries: Annotated[int, Field(ge=0)] = 8
    retry_backoff_seconds: Annotated[float, Field(gt=0)] = 5.0
    retry_backoff_max_seconds: Annotated[float, Field(gt=0)] = 600.0
    # A study queued, inferring or exporting without a state change for this long is sent to
    # the broker again (its message may have died with a Redis that keeps nothing on disk).
    # Empty: the visibility timeout, after which Redis itself would redeliver an unacknowledged
    # message, and by which any task still running has long been stopped by the time limit.
    stale_after_seconds: Annotated[float, Field(gt=0)] | None = None
    # A running task renews its job's lease every quarter of this; a job inferring or exporting
    # whose lease has not been renewed for this long lost its worker (killed, out of memory, a
    # node gone) and is sent to the broker again. A live worker keeps its job however long the
    # inference takes.
    lease_seconds: Annotated[float, Field(ge=2)] = 30.0
    # Calling AE titles (shell-style globs, case-insensitive) whose studies are urgent, e.g. the
    # emergency department's CT: their jobs go to the urgent queues, ahead of normal ones.
    urgent_senders: tuple[Pattern, ...] = ()
    # While normal jobs wait, at most this many urgent jobs in a row run before one normal job
    # does, so that a stream of urgent studies never starves the others.
    urgent_burst: Annotated[int, Field(ge=1)] = 3

    @field_validator("broker_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0]
        if "://" not in value or scheme not in {"memory", "redis", "rediss"}:
            raise ValueError("must start with memory:// or redis:// (or rediss://)")
        return value

    @property
    def embedded(self) -> bool:
        """True when the broker lives inside the `serve` process (no separate workers)."""
        return self.broker_url.startswith("memory://")

    @property
    def visibility_timeout_seconds(self) -> int:
        """How long Redis keeps an unacknowledged message before redelivering it."""
        return 2 * self.task_time_limit_seconds + 60

    @property
    def stale_after(self) -> float:
        """Seconds without a state change after which an in-flight study is sent again."""
        if self.stale_after_seconds is not None:
            return self.stale_after_seconds
        return float(self.visibility_timeout_seconds)


class SelectRules(_Section):
    """Which series of a study a model takes (all must hold); see `pacs-agent rules test`.

    Patterns are shell-style globs (`*`, `?`, `[...]`), matched case-insensitively against the
    whole value; ImageType is matched as its values joined by backslashes, as DICOM writes it
    (e.g. `ORIGINAL\\PRIMARY\\AXIAL`). An empty include list means "anything".
    """

    modalities: tuple[str, ...] = ("CT",)
    body_parts: tuple[Pattern, ...] = ()
    series_description_include: tuple[Pattern, ...] = ()
    series_description_exclude: tuple[Pattern, ...] = ()
    image_type_include: tuple[Pattern, ...] = ()
    image_type_exclude: tuple[Pattern, ...] = ("*LOCALIZER*",)
    min_slices: Annotated[int, Field(ge=2)] = 3
    # Compared with SliceThickness (median over the stack) when the images state it.
    max_slice_thickness_mm: Annotated[float, Field(gt=0)] | None = None
    orientation: Literal["axial", "coronal", "sagittal", "oblique", "any"] = "axial"
    # "with": ContrastBolusAgent (or its sequence) is present and not empty; "without": it is not.
    contrast: Literal["any", "with", "without"] = "any"

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one modality is needed")
        return tuple(v.upper() for v in value)


class ModelSettings(_Section):
    name: str = "ct-tissue"
    # "urgent": every study this model takes is urgent (e.g. a stroke model), see [queue].
    priority: Literal["normal", "urgent"] = "normal"
    # "off" is the kill switch: the model is not run, and a study with no other model is
    # skipped. "paused": its studies are sealed and queued but held until it is "on" again.
    # `pacs-agent models on|pause|off NAME` overrides this at run time, without a restart.
    state: ModelState = "on"
    # "auto": the GPU (cuda:0 of those the process sees) when there is one, else the CPU with
    # a warning; "cuda" or "cuda:N": that GPU or retry later; "cpu". A worker's --device
    # replaces "auto".
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")] = "auto"
    select: SelectRules = SelectRules()
    # A model package (a folder, .zip or .tar with a model.toml, see README "Model packages");
    # unset: the built-in model called `name` (ct-tissue).
    package: Path | None = None
    # "package": as the package's manifest says; else the network's precision on CUDA.
    precision: Literal["package", "float32", "float16", "bfloat16"] = "package"
