"""The shared contracts of the project: the bottom layer, which every other module may import.

It imports nothing from the project except :mod:`benchmark.core.errors` (itself a leaf), so that
data, backbones, methods, evaluation and the command line can all agree on these names
without importing each other:

* the registries (methods, datasets, perf commands, analyses, figures) and the decorators that
  fill them: a method, dataset or tool registers itself where it is defined, and the framework
  looks it up by name (:mod:`benchmark.core.registry` imports the modules that define them);
* :class:`DataRequest` (and the view / normalisation requests it carries): what a method asks
  of the training data;
* the evaluation batch: the keys a ``validation_step`` / ``test_step`` returns
  (:func:`evaluation_outputs`);
* :class:`RankedLists` and :class:`Refiner`: the transductive refinement protocol between a
  method and the evaluator.

``tests/test_architecture.py`` parses every module's imports and fails on a cycle or on an
import that goes up the layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from benchmark.core.errors import UserError

if TYPE_CHECKING:  # annotations only: this module stays importable without numpy and torch (`list`, `suite status`)
    import numpy as np
    import torch

T = TypeVar("T")


# ---------------------------------------------------------------------------- registries
class UnknownNameError(UserError, KeyError):
    """A name that is not registered; the message lists the valid choices."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0])


METHODS: dict[str, type] = {}  # --method NAME -> RetrievalMethod subclass
DATASETS: dict[str, type] = {}  # --data NAME -> RetrievalDataModule subclass


@dataclass(frozen=True)
class Command:
    """A ``python -m benchmark perf|analyze NAME`` command registered by the module that owns it.

    ``run(argv) -> exit code``; ``summary`` is the one line ``--help`` lists; ``owner`` the
    module that registered it.
    """

    name: str
    run: Callable[[list[str]], int]
    summary: str
    owner: str


PERF_COMMANDS: dict[str, Command] = {}
ANALYSES: dict[str, Command] = {}


@dataclass(frozen=True)
class Figure:
    """A figure registered by the module that owns it (``@register_figure``).

    ``draw(context) -> FigureResult``: given a :class:`benchmark.engine.figures.FigureContext` (the
    evaluation's gathered embeddings, labels and rankings, the model, the datamodule, the run
    directory, the output folder and the seed), writes its PNG files and returns them with the
    data it drew. Every figure is a ``python -m benchmark analyze NAME --ckpt PATH`` command;
    ``after_test`` ones are also drawn into ``runs/<run>/figures/`` after every ``test`` of a
    run (``--figures false`` turns that off).

    Attributes:
        methods: the registered method names it applies to; empty: every method.
        after_test: drawn after every test of a run (keep these cheap: subsample).
        initial_model: needs the model as initialised, before the checkpoint's weights
            (``context.initial_model``), e.g. to compare the start and the end of training.
        evaluation: draws from the evaluation of the split (``context.evaluation``); a figure
            without (training curves, one that embeds what it needs itself) spares ``analyze``
            the pass over the split.
    """

    name: str
    draw: Callable[[Any], Any]
    summary: str
    owner: str
    methods: tuple[str, ...] = ()
    after_test: bool = False
    initial_model: bool = False
    evaluation: bool = True

    def applies_to(self, method: str) -> bool:
        return not self.methods or method in self.methods


FIGURES: dict[str, Figure] = {}


def _add(table: dict[str, Any], kind: str, name: str, obj: Any, owner: str) -> None:
    if not name:
        raise ValueError(f"A {kind} needs a non-empty name to be registered ({owner}).")
    previous = table.get(name)
    same = previous is obj or (
        isinstance(previous, (Command, Figure)) and type(previous) is type(obj) and previous.owner == obj.owner
    )
    if previous is not None and not same:
        where = previous.owner if isinstance(previous, (Command, Figure)) else previous.__module__
        raise ValueError(f"{kind.capitalize()} name {name!r} is already registered by {where}.")
    table[name] = obj


def _register_class(table: dict[str, type], kind: str, attribute: str, name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        _add(table, kind, name, cls, cls.__module__)  # type: ignore[attr-defined]
        setattr(cls, attribute, name)
        return cls

    return wrap


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: make a ``RetrievalMethod`` subclass available as ``--method name``."""
    return _register_class(METHODS, "method", "method_name", name)


def register_dataset(name: str) -> Callable[[T], T]:
    """Class decorator: make a ``RetrievalDataModule`` subclass available as ``--data name``."""
    return _register_class(DATASETS, "dataset", "name", name)


def _register_command(table: dict[str, Command], kind: str, name: str, summary: str):
    def wrap(fn: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        _add(table, kind, name, Command(name, fn, summary, fn.__module__), fn.__module__)
        return fn

    return wrap


def register_perf(name: str, summary: str) -> Callable[[Callable[[list[str]], int]], Callable[[list[str]], int]]:
    """Function decorator: ``main(argv) -> int`` becomes ``python -m benchmark perf name``."""
    return _register_command(PERF_COMMANDS, "perf command", name, summary)


def logs_this_step(trainer: Any) -> bool:
    """Whether this training step's metrics are written: Lightning writes the step values to the
    loggers every ``log_every_n_steps`` steps (and when the trainer stops); the figure layer's
    history also takes the last batch of an epoch. The method base logs its per-step terms only
    then, and the figure writer records only then: ``self.log`` costs about 0.5-1 ms per call on
    a CPU, and a value logged at any other step is overwritten before anything reads it (except
    the progress bar, which then refreshes its loss at the logging steps).
    """
    if trainer is None:
        return True
    try:
        due = bool(trainer._logger_connector.should_update_logs)  # the condition Lightning writes by
        last = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
    except AttributeError:  # another trainer (or a Lightning without these): log every step
        return True
    return due or last


@dataclass(frozen=True)
class Headline:
    """One key number of a perf command (what ``perf gpu`` collects and checks against a goal).

    ``goal`` is the value to reach: at least it when ``higher_is_better``, at most it otherwise.
    """

    label: str
    value: float
    unit: str
    goal: float | None = None
    higher_is_better: bool = True

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.value != self.value:  # no goal, or NaN
            return None
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal


PERF_HEADLINES: list[Headline] = []


def perf_headline(label: str, value: float, unit: str, goal: float | None = None, higher_is_better: bool = True) -> None:
    """Record a perf command's key number (printed by the command itself as well); ``perf gpu``
    reads them after each command it runs."""
    PERF_HEADLINES.append(Headline(label, float(value), unit, goal, higher_is_better))


def register_analysis(name: str, summary: str) -> Callable[[Callable[[list[str]], int]], Callable[[list[str]], int]]:
    """Function decorator: ``main(argv) -> int`` becomes ``python -m benchmark analyze name``."""
    return _register_command(ANALYSES, "analysis", name, summary)


def register_figure(
    name: str, summary: str, *, methods: tuple[str, ...] | list[str] = (), after_test: bool = False,
    initial_model: bool = False, evaluation: bool = True,
) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Function decorator: ``draw(context) -> FigureResult`` becomes the figure ``name``
    (``python -m benchmark analyze name``; see :class:`Figure` for the options)."""

    def wrap(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        figure = Figure(name, fn, summary, fn.__module__, tuple(methods), after_test, initial_model, evaluation)
        _add(FIGURES, "figure", name, figure, fn.__module__)
        return fn

    return wrap


# ---------------------------------------------------------------------------- data requests
@dataclass(frozen=True)
class Normalization:
    """Input statistics of an encoder (from its timm ``pretrained_cfg``)."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class ViewRequest:
    """How many views of each training image a method needs, and how they are made.

    ``num_views == 1`` gives a (C, H, W) image per sample, more gives (V, C, H, W). With
    ``augment == "randaugment"`` every view is RandAugment applied to one shared training
    crop, except view 0 when ``keep_original`` is set: it is the crop itself.
    """

    num_views: int = 1
    augment: str | None = None
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    keep_original: bool = True


@dataclass
class DataRequest:
    """What a method needs from the training data, applied before loaders are built.

    ``normalization`` comes from the encoder; ``views`` from methods that train on several
    augmented views (DMCAC); ``train_indices`` restricts training batches to a subset of the
    training split (DMCAC's query set); ``sampler`` picks class-balanced or shuffled batches;
    ``load_images=False`` gives training batches without images (label and index only) for
    methods that train on cached embeddings (Context-Refine); ``min_samples_per_class`` is what
    a loss on positive pairs needs of ``samples_per_class``.
    """

    normalization: Normalization = field(default_factory=Normalization)
    views: ViewRequest = field(default_factory=ViewRequest)
    train_indices: np.ndarray | None = None
    sampler: Literal["balanced", "shuffle"] = "balanced"
    load_images: bool = True
    #: Images of one class a class-balanced batch must hold: 2 for losses on positive pairs (with 1 a
    #: batch has no positive pair and such a loss is 0 at every step).
    min_samples_per_class: int = 1


# ---------------------------------------------------------------------------- evaluation batch
EVALUATION_KEYS = ("embeddings", "labels", "indices", "is_query", "is_gallery")
#: Where the evaluation computes (``RetrievalEvaluator(backend=...)``): the module's device, or one named.
EVALUATION_BACKENDS = ("auto", "cpu", "cuda")
#: Memory for one block of a chunked similarity computation (neighbour search, metrics, refinement).
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def evaluation_outputs(embeddings: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """What a ``validation_step`` / ``test_step`` returns for the evaluator (:data:`EVALUATION_KEYS`).

    ``embeddings`` (B, D) for the batch's samples; labels, dataset indices and query/gallery
    flags are passed through from the datamodule's batch (keys ``label``, ``index``,
    ``is_query``, ``is_gallery``).
    """
    return {
        "embeddings": embeddings,
        "labels": batch["label"],
        "indices": batch["index"],
        "is_query": batch["is_query"],
        "is_gallery": batch["is_gallery"],
    }


# ---------------------------------------------------------------------------- refinement protocol
@dataclass(frozen=True)
class RankedLists:
    """Re-ranked neighbour lists returned by a method's transductive ``refine`` step.

    Attributes:
        indices: (Q, k) int64 positions into the N evaluated samples (ascending dataset
            index). Row q belongs to the q-th query in ascending dataset-index order; entries
            are gallery samples, best first, the query itself excluded. ``-1`` pads a row
            with fewer than k entries. Positives beyond the list count as misses.
    """

    indices: torch.Tensor

    def __post_init__(self) -> None:
        import torch  # a method that refines has imported torch already

        if not isinstance(self.indices, torch.Tensor) or self.indices.ndim != 2:
            raise TypeError(
                "RankedLists.indices must be a 2-D LongTensor (num_queries, k); "
                f"got {type(self.indices).__name__} with shape {getattr(self.indices, 'shape', None)}."
            )
        if self.indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"RankedLists.indices must hold integer positions; got dtype {self.indices.dtype}.")

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


@runtime_checkable
class Refiner(Protocol):
    """A method with a transductive test-time step, called by the evaluator after embedding.

    ``refine(embeddings (N, D), is_query (N,), is_gallery (N,))``, rows in ascending dataset
    index, returns ``None`` or a dict whose values are (N, D') refined embeddings or
    :class:`RankedLists`; each is reported as ``<stage>/refined[/<key>]/<metric>``.
    """

    def refine(
        self, embeddings: torch.Tensor, is_query: torch.Tensor, is_gallery: torch.Tensor
    ) -> dict[str, torch.Tensor | RankedLists] | None: ...
