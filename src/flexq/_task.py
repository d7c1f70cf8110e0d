"""Registered tasks: the only code a job can run."""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import typing
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Generic, TypeAlias, TypeVar

from flexq._context import Context
from flexq._errors import InvalidArguments
from flexq._states import Kind

if typing.TYPE_CHECKING:
    from flexq._backoff import Backoff
    from flexq._batch import BatchSpec

R = TypeVar("R")
_NO_NAMES: frozenset[str] = frozenset()

Handler: TypeAlias = Callable[..., Awaitable[R]]


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Task(Generic[R]):
    """An ``async def`` registered with a queue under a name, with its job options.

    Calling the task calls the function directly (no job is created); use
    ``queue.enqueue(task, ...)`` to run it as a job.
    """

    name: str
    fn: Handler[R]
    kind: Kind
    retries: int
    timeout: float | None
    priority: int
    backoff: Backoff | None
    context_parameter: str | None
    """The parameter that receives the job's :class:`flexq.Context`, if any."""
    signature: inspect.Signature
    """The function's signature without the context parameter: what a job's arguments bind to."""
    context_position: int | None
    """Where the context goes among positional arguments (None: by keyword)."""
    batch: BatchSpec | None = None
    """For a batch task (``@queue.batch``): its class, scope and chunk concurrency."""
    callout: bool = False
    """Whether its jobs run in the callout pool (``callout_concurrency``), not on the workers."""
    _fitting_shapes: set[tuple[int, frozenset[str]]] = dataclasses.field(
        default_factory=set, repr=False
    )

    @property
    def max_attempts(self) -> int:
        """Attempts a job of this task gets: one plus its retries."""
        return self.retries + 1

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[R]:
        return self.fn(*args, **kwargs)

    def arguments(
        self, context: Context | None, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """The positional and keyword arguments to call ``fn`` with, context included."""
        if self.context_parameter is None:
            return args, kwargs
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call_args, call_kwargs = list(bound.args), dict(bound.kwargs)
        if self.context_position is None:
            call_kwargs[self.context_parameter] = context
        else:
            call_args.insert(self.context_position, context)
        return call_args, call_kwargs

    def check_arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Raise :class:`InvalidArguments` unless the arguments fit the function."""
        shape = (len(args), frozenset(kwargs) if kwargs else _NO_NAMES)
        if shape in self._fitting_shapes:
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArguments(
                f"arguments do not fit task {self.name!r}{self.signature}: {exc}"
            ) from None
        self._fitting_shapes.add(shape)


class TaskNames(collections.abc.Set[str]):
    """The names of the registered tasks whose ``callout`` flag is ``callout``: a live view of
    a registry, which tasks are only ever added to."""

    def __init__(self, tasks: Mapping[str, Task[Any]], *, callout: bool) -> None:
        self._tasks = tasks
        self._callout = callout
        self._seen = 0
        self._names: frozenset[str] = frozenset()

    def _current(self) -> frozenset[str]:
        if len(self._tasks) != self._seen:
            self._names = frozenset(n for n, t in self._tasks.items() if t.callout is self._callout)
            self._seen = len(self._tasks)
        return self._names

    def __contains__(self, name: object) -> bool:
        return name in self._current()

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


TaskRef: TypeAlias = "Task[Any] | str | type"
"""A task given by its object, its registered name, or (a batch) its class."""


def make_task(
    fn: Handler[R],
    *,
    name: str | None,
    kind: Kind | str,
    retries: int,
    timeout: float | None,
    priority: int,
    backoff: Backoff | None,
    callout: bool = False,
) -> Task[R]:
    """Validate a handler and its options into a :class:`Task`."""
    if not inspect.iscoroutinefunction(fn):
        raise InvalidArguments(f"{fn!r} is not an async function: a task must be `async def`")
    try:
        job_kind = Kind(kind)
    except ValueError:
        raise InvalidArguments(f"kind must be 'future' or 'queueable', not {kind!r}") from None
    if job_kind not in (Kind.FUTURE, Kind.QUEUEABLE):
        raise InvalidArguments(f"kind must be 'future' or 'queueable', not {kind!r}")
    task_name = check_options(fn, name=name, retries=retries, timeout=timeout, priority=priority)
    if not isinstance(callout, bool):
        raise InvalidArguments(f"callout must be True or False, not {callout!r}")
    context_parameter = _context_parameter(fn)
    signature = inspect.signature(fn)
    context_position = None
    if context_parameter is not None:
        parameters = list(signature.parameters.values())
        names = [p.name for p in parameters]
        context = parameters[names.index(context_parameter)]
        if context.kind in (context.POSITIONAL_ONLY, context.POSITIONAL_OR_KEYWORD):
            context_position = names.index(context_parameter)
        signature = signature.replace(
            parameters=[p for p in parameters if p.name != context_parameter]
        )
    return Task(
        name=task_name, fn=fn, kind=job_kind, retries=retries, timeout=timeout,
        priority=priority, backoff=backoff, context_parameter=context_parameter,
        signature=signature, context_position=context_position, callout=callout,
    )  # fmt: skip


def check_options(
    fn: Callable[..., Any] | type, *, name: str | None, retries: int, timeout: float | None,
    priority: int,
) -> str:  # fmt: skip
    """Validate the options every task takes; return its name (default ``module.qualname``)."""
    if not _is_int(retries) or retries < 0:
        raise InvalidArguments(f"retries must be an int >= 0, not {retries!r}")
    if timeout is not None and not (_is_number(timeout) and 0 < timeout < math.inf):
        raise InvalidArguments(f"timeout must be a positive number of seconds, not {timeout!r}")
    check_priority(priority)
    task_name = name if name is not None else f"{fn.__module__}.{fn.__qualname__}"
    if not isinstance(task_name, str) or not task_name:
        raise InvalidArguments(f"a task name must be a non-empty string, not {task_name!r}")
    return task_name


def check_priority(priority: object) -> int:
    """Return ``priority`` if it is a valid job priority, else raise InvalidArguments."""
    if not _is_int(priority) or not -(2**31) <= priority < 2**31:  # type: ignore[operator]
        raise InvalidArguments(f"priority must be an int in [-2**31, 2**31), not {priority!r}")
    return priority  # type: ignore[return-value]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _context_parameter(fn: Callable[..., Any]) -> str | None:
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    for parameter in inspect.signature(fn).parameters.values():
        annotation = hints.get(parameter.name, parameter.annotation)
        if isinstance(annotation, type) and issubclass(annotation, Context):
            return parameter.name
        if isinstance(annotation, str) and annotation.rsplit(".", 1)[-1] == "Context":
            return parameter.name
    return None
