"""Executors: the same stage functions run in-process (tests, debugging) or on Ray.

Both expose ``ingest``, ``exact``, ``tokenize`` and ``shards``, each taking a list of jobs and yielding
``(job_index, result)`` as jobs finish. Results are pure functions of the jobs, so the order
of completion never shows in the output. On Ray, ingest and shard writing are tasks (retried
when their worker dies), tokenization runs in actors that load the World tokenizer once each
(restarted and their in-flight call retried when the actor process dies).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from pipeline import stages


class LocalExecutor:
    """Runs every job in this process, in order."""

    name = "local"

    def __init__(self):
        self._tok = None

    def prepare(self, n_units: int) -> None:
        pass

    def ingest(self, jobs: list[tuple]) -> Iterator[tuple[int, dict]]:
        for i, job in enumerate(jobs):
            yield i, stages.ingest_unit(*job)

    def exact(self, jobs: list[tuple]) -> Iterator[tuple[int, tuple]]:
        for i, job in enumerate(jobs):
            yield i, stages.exact_duplicates(*job)

    def tokenize(self, jobs: list[tuple]) -> Iterator[tuple[int, dict]]:
        if self._tok is None:
            from tokenizer import WorldTokenizer

            self._tok = WorldTokenizer()
        for i, (name, work, removed) in enumerate(jobs):
            yield i, stages.tokenize_unit(name, work, removed, self._tok)

    def shards(self, jobs: list[tuple]) -> Iterator[tuple[int, dict]]:
        for i, job in enumerate(jobs):
            yield i, stages.write_shard(*job)

    def close(self) -> None:
        pass


def _ray_remote_defs():
    import ray

    @ray.remote(num_cpus=1, max_retries=4)
    def ingest_task(unit, comp, work, near):
        return stages.meta_counts_only(stages.ingest_unit(unit, comp, work, near), work, unit.name)

    @ray.remote(num_cpus=1, max_retries=4)
    def shard_task(index, pieces, out_dir):
        return stages.write_shard(index, pieces, out_dir)

    @ray.remote(num_cpus=1, max_retries=4)
    def exact_task(paths, part, parts):
        return stages.exact_duplicates(paths, part, parts)

    # num_cpus=0: the actors are started during ingest (their start-up and tokenizer load overlap
    # it) and only work after ingest is done; SPREAD puts them on different nodes of a cluster.
    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=4, scheduling_strategy="SPREAD")
    class TokenizeWorker:
        def __init__(self):
            from tokenizer import WorldTokenizer

            self.tok = WorldTokenizer()

        def tokenize(self, name, work, removed):
            return stages.tokenize_unit(name, work, removed, self.tok)

    return ingest_task, shard_task, exact_task, TokenizeWorker


class RayExecutor:
    """Runs jobs as Ray tasks/actors on the cluster ``ray.init`` connected to."""

    name = "ray"

    def __init__(self, max_in_flight: int | None = None):
        import ray

        self.ray = ray
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.max_in_flight = max_in_flight or 2 * self.cpus
        self._ingest, self._shard, self._exact, self._Worker = _ray_remote_defs()
        self._actors: list = []

    def _run(self, submit, jobs: list[tuple]) -> Iterator[tuple[int, object]]:
        ray = self.ray
        pending: dict = {}
        nxt = 0
        while nxt < len(jobs) or pending:
            while nxt < len(jobs) and len(pending) < self.max_in_flight:
                pending[submit(nxt, jobs[nxt])] = nxt
                nxt += 1
            for ref in self._ready(list(pending)):
                yield pending.pop(ref), ray.get(ref)

    def _ready(self, refs: list) -> list:
        """Every ref of ``refs`` that is done, waiting until at least one is: all that finished meanwhile in
        two ``ray.wait`` calls. One call per finished job (each costs ~0.1-1 us per ref in flight) cost the driver
        0.25 ms per job at 2,048 in flight, against 0.004 ms this way. Which refs come back together never shows
        in the output: callers place results by job index."""
        done, rest = self.ray.wait(refs, num_returns=1)
        if rest:
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            done = done + more
        return done

    def ingest(self, jobs: list[tuple]) -> Iterator[tuple[int, dict]]:
        yield from self._run(lambda i, job: self._ingest.remote(*job), jobs)

    def shards(self, jobs: list[tuple]) -> Iterator[tuple[int, dict]]:
        yield from self._run(lambda i, job: self._shard.remote(*job), jobs)

    def exact(self, jobs: list[tuple]) -> Iterator[tuple[int, tuple]]:
        yield from self._run(lambda i, job: self._exact.remote(*job), jobs)

    def prepare(self, n_units: int) -> None:
        """Start the tokenizer actors now, so they are warm when tokenization begins."""
        while len(self._actors) < min(n_units, self.cpus):
            self._actors.append(self._Worker.remote())

    def tokenize(self, jobs: list[tuple]) -> Iterator[tuple[int, dict]]:
        self.prepare(len(jobs))
        busy: dict = {}  # ref -> (job index, actor)
        free = list(self._actors)
        nxt = 0
        while nxt < len(jobs) or busy:
            while nxt < len(jobs) and free:
                actor = free.pop()
                busy[actor.tokenize.remote(*jobs[nxt])] = (nxt, actor)
                nxt += 1
            for ref in self._ready(list(busy)):
                i, actor = busy.pop(ref)
                free.append(actor)
                yield i, self.ray.get(ref)
        self.close()

    def close(self) -> None:
        for a in self._actors:
            self.ray.kill(a)
        self._actors = []


def default_object_store_bytes() -> int:
    """A small object store: the pipeline passes file paths, not data, between stages."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 * 2**30
    return int(min(2 * 2**30, max(256 * 2**20, total // 10)))


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` / ``$RAY_ADDRESS`` (``ray job submit``), or start Ray locally
    sized for this machine. Returns True if this call started the connection."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        token = os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(
            os.environ.get("RAY_AUTH_TOKEN_PATH", os.path.expanduser("~/.ray/auth_token")))
        if token and "RAY_AUTH_MODE" not in os.environ:
            # A cluster started on a machine with a Ray token (~/.ray/auth_token) requires it, but
            # ray.init(address=...) only sends it in explicit token mode; the mode is read into
            # Ray's cached config, so setting the variable alone is not enough once ray is imported.
            try:
                from ray._private.authentication.authentication_token_setup import _enable_token_auth

                _enable_token_auth()
            except ImportError:  # Ray versions without token auth
                pass
        ray.init(address=address or None, log_to_driver=True)
    else:
        # address="local": a new instance even when `ray start` recorded a cluster on this machine (a bare
        # ray.init() would connect to that one, then refuse num_cpus)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                 object_store_memory=default_object_store_bytes(), include_dashboard=False, log_to_driver=True)
    return True
