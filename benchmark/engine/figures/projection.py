"""2-D projections of embeddings for the maps: a seeded t-SNE (openTSNE) that fits a time budget, else PCA.

:func:`project` runs the longest of :data:`TSNE_SCHEDULES` that fits the time left (its docstring
holds the measurements behind the schedule and the single thread), or PCA when none does, and says
what ran (:class:`Projection`). Plain numpy (openTSNE imported when used), no drawing: kept apart
from the map that draws it (:mod:`~benchmark.engine.figures.embedding_map`) because its budget
logic reads on its own and any figure that maps embeddings can use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

#: t-SNE schedules (early-exaggeration + normal iterations), the full one first: under a time budget the
#: longest that fits is run (each a fixed schedule, so a given one always gives the same map).
TSNE_SCHEDULES = ((100, 200), (50, 100), (25, 50))
_TSNE_CHUNK = 10  # iterations between clock checks (the first chunk also measures an iteration's cost)


@dataclass(frozen=True)
class Projection:
    """A 2-D projection and how it was made.

    Attributes:
        coords: (n, 2) positions.
        method: its name as captions show it (``t-SNE (openTSNE)``, ``t-SNE (openTSNE, 50 + 100
            iterations)``, ``PCA``).
        iterations: the t-SNE's early-exaggeration and normal iterations run; None for PCA.
        seconds: what it took, the openTSNE import included.
        note: why it is not the full t-SNE (a time budget, too few points); "" when it is.
    """

    coords: np.ndarray
    method: str
    iterations: tuple[int, int] | None
    seconds: float
    note: str = ""


def project_2d(points: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """(n, D) -> (n, 2) by the full t-SNE schedule (see :func:`project`), and the method's name."""
    projection = project(points, seed)
    return projection.coords, projection.method


def project(points: np.ndarray, seed: int, seconds: float | None = None) -> Projection:
    """(n, D) -> 2-D by t-SNE (openTSNE: Barnes-Hut, exact neighbours, PCA initialisation, seeded:
    the same input and schedule give the same map), within ``seconds`` when given.

    It runs on one thread. Two threads were faster on an idle machine (0.65 s against 1.0 s for
    the main job's 600 points), but under contention, on a machine that runs something else or
    in the fit's process where the evaluation's threads may still hold the cores, openTSNE's
    threads wait on each other: 290 iterations of 600 points took 6.3-7.9 s on 2 threads against
    0.39 s on one (2-core AMD EPYC, load average 3.4). That was the smoke cells' 15-20 s map.

    A short schedule (100 early-exaggeration + 200 iterations; openTSNE's default is 250 + 500)
    keeps a 600-point map near half a second: on the main job's 600 test embeddings the final KL
    divergence is 0.529, against 0.519 with 125 + 300 and 0.520 with the default (2-core AMD
    EPYC: 0.69 s, 0.99 s, 1.59 s).

    The time budget: the first 10 iterations measure an iteration's cost on this machine, now;
    the longest of :data:`TSNE_SCHEDULES` whose predicted time fits in ``seconds`` is run, and
    when none fits, PCA (a few milliseconds) is used and the note says why. The optimisation also
    stops at ``seconds`` should the machine slow down on the way (a loaded machine once took
    15-20 s for this map), and says so. Fewer than 12 points, or without openTSNE, PCA is used
    and named.
    """
    start = time.perf_counter()
    x = np.asarray(points, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # the cosine geometry the metrics use
    if len(x) < 12:
        return _pca(x, start, "")
    if seconds is not None and seconds <= 0:
        return _pca(x, start, "PCA: no time left in the figures' time budget for a t-SNE")
    try:
        from openTSNE import TSNE
        from openTSNE.affinity import PerplexityBasedNN
        from openTSNE.nearest_neighbors import PrecomputedNeighbors
    except ImportError:
        return _pca(x, start, "", name="PCA (openTSNE not installed)")
    full = TSNE_SCHEDULES[0]
    perplexity = float(min(30.0, (len(x) - 1) / 3.5))
    tsne = TSNE(
        n_components=2, perplexity=perplexity, n_iter=full[1], early_exaggeration_iter=full[0],
        negative_gradient_method="bh", initialization="pca", random_state=int(seed), n_jobs=1, verbose=False,
    )
    # The exact neighbours openTSNE's "exact" option finds (3 x perplexity of them), from one matrix
    # product: scikit-learn's search took 0.14 s of the main job's 0.17 s of preparation.
    neighbours = PrecomputedNeighbors(*exact_neighbours(x, min(len(x) - 1, int(3 * perplexity))))
    affinities = PerplexityBasedNN(knn_index=neighbours, perplexity=perplexity, verbose=False)
    embedding = tsne.prepare_initial(x, affinities=affinities)
    spent = time.perf_counter() - start
    if seconds is not None and spent >= seconds:  # not even one chunk of iterations fits
        return _pca(x, start, f"PCA: preparing a t-SNE (import, affinities) took {spent:.2f} s, the "
                              f"{seconds:.2f} s left in the figures' time budget")
    # openTSNE's own fit() runs these two phases in one call each; in chunks, the optimiser keeps its
    # state between calls, so a schedule gives the same map however it is chunked (to 1e-9).
    phases = ((tsne.early_exaggeration, tsne.initial_momentum), (tsne.exaggeration, tsne.final_momentum))

    def step(phase: int, n_iter: int) -> None:
        exaggeration, momentum = phases[phase]
        embedding.optimize(n_iter=n_iter, exaggeration=exaggeration, momentum=momentum, inplace=True,
                           propagate_exception=True)

    chunk_start = time.perf_counter()
    step(0, _TSNE_CHUNK)
    per_iteration = (time.perf_counter() - chunk_start) / _TSNE_CHUNK
    schedule = full if seconds is None else tsne_schedule(time.perf_counter() - start, per_iteration, seconds)
    if schedule is None:
        shortest = time.perf_counter() - start + per_iteration * (sum(TSNE_SCHEDULES[-1]) - _TSNE_CHUNK)
        return _pca(x, start, f"PCA: the shortest t-SNE ({' + '.join(map(str, TSNE_SCHEDULES[-1]))} iterations) "
                              f"would take {shortest:.2f} s, over the {seconds:.2f} s left in the figures' time budget")
    done = [_TSNE_CHUNK, 0]
    stopped = False
    for phase in (0, 1):
        while done[phase] < schedule[phase] and not stopped:
            # every call ends with one more evaluation of the objective: longer chunks from here on
            n_iter = min(2 * _TSNE_CHUNK + 5, schedule[phase] - done[phase])
            step(phase, n_iter)
            done[phase] += n_iter
            stopped = seconds is not None and time.perf_counter() - start > seconds
    ran = (done[0], done[1])
    name = "t-SNE (openTSNE)" if ran == full else f"t-SNE (openTSNE, {ran[0]} + {ran[1]} iterations)"
    if stopped and ran != schedule:
        note = (f"t-SNE stopped at the figures' time budget ({seconds:.2f} s) after {ran[0]} + {ran[1]} of "
                f"{schedule[0]} + {schedule[1]} iterations: the machine slowed down")
    elif schedule != full:
        note = (f"t-SNE shortened to {schedule[0]} + {schedule[1]} of {full[0]} + {full[1]} iterations to fit the "
                f"figures' time budget ({seconds:.2f} s left); `analyze embedding_map` draws the full one")
    else:
        note = ""
    return Projection(np.asarray(embedding), name, ran, time.perf_counter() - start, note)


def exact_neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other rows of unit-length ``x`` by euclidean distance, (indices, distances),
    nearest first, ties to the lower index (a stable sort of one distance matrix)."""
    squared = np.maximum(2.0 - 2.0 * (x @ x.T), 0.0)  # |a - b|^2 of unit vectors
    np.fill_diagonal(squared, np.inf)
    order = np.argsort(squared, axis=1, kind="stable")[:, :k]
    return order, np.sqrt(np.take_along_axis(squared, order, axis=1))


def tsne_schedule(spent: float, per_iteration: float, seconds: float) -> tuple[int, int] | None:
    """The longest of :data:`TSNE_SCHEDULES` that ends within ``seconds``, given the ``spent`` seconds
    (import, affinities, the first 10 iterations) and an iteration's measured cost; None if none does."""
    for schedule in TSNE_SCHEDULES:
        if spent + per_iteration * (sum(schedule) - _TSNE_CHUNK) <= seconds:
            return schedule
    return None


def _pca(x: np.ndarray, start: float, note: str, name: str = "PCA") -> Projection:
    """The first two principal components of ``x``, in a deterministic orientation."""
    if len(x) < 2:
        return Projection(np.zeros((len(x), 2)), name, None, time.perf_counter() - start, note)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vt[:2].T
    if proj.shape[1] < 2:
        proj = np.pad(proj, ((0, 0), (0, 2 - proj.shape[1])))
    signs = np.sign(proj[np.abs(proj).argmax(axis=0), range(2)])
    return Projection(proj * np.where(signs == 0, 1, signs), name, None, time.perf_counter() - start, note)
