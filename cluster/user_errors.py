"""A user error raised in a Ray Train worker ends the run instead of being retried.

Ray Train restarts a worker group that raised, up to ``cluster.max_failures`` times: right for a
lost node, wasteful for bad input or a diverged loss, which fail the same way on every try (a
learning rate that diverges ran the whole correction job three times, 53 s of the 65 it took to
say so on the test model; on a 7B model each try loads the model again). The first worker to
raise a ``UserError`` keeps it in a small actor (the latch); the workers of any retry find it
there and return at once, and the driver raises it.

    result = fit_torch_trainer(train_func, config, scaling_config=..., run_config=...)
"""

from __future__ import annotations

import contextlib
import functools
import signal
from collections.abc import Callable, Iterator

from cluster.signals import handler_for
from operators.errors import UserError, chain

_LATCH = "user_error_latch"
# The CPU allocator's words for an allocation the machine cannot give (a RuntimeError).
CPU_OOM = "DefaultCPUAllocator: not enough memory"
OOM_CLASS = "OutOfMemoryError: "  # torch's error as Ray passes it on in a worker's traceback text
MEMORY_ADVICE = (
    "lower the rows per batch (cluster.batch_size for fit_factors and score, ibo.batch_size for "
    "ibo) or model.max_length, set influence.query_rank for score, or give ibo a DeepSpeed "
    "config with a higher ZeRO stage (ibo.deepspeed_config) or ibo.lora.enabled=true; "
    "`python -m pipeline.plan` prints each stage's peak memory per GPU")


class DeviceMemoryError(UserError):
    """The device (or the host) ran out of memory: a setting too large for the hardware, which
    fails the same way on every try, so it is not retried."""


def as_memory_error(err: BaseException) -> DeviceMemoryError | None:
    """``err`` (or what it wraps) as a ``DeviceMemoryError`` when it is torch's out-of-memory
    error (CUDA) or the CPU allocator's; Ray passes a worker's error on wrapped, or as text."""
    import torch
    for seen in chain(err):
        if isinstance(seen, DeviceMemoryError):
            return seen
        text = str(seen)
        if isinstance(seen, torch.OutOfMemoryError) or CPU_OOM in text or OOM_CLASS in text:
            return DeviceMemoryError(f"out of memory ({_allocator_words(text)}): "
                                     f"{MEMORY_ADVICE}")
    return None


def _allocator_words(text: str) -> str:
    """The allocator's line of ``text``, without the class name Ray's text puts before it."""
    line = next((ln for ln in text.splitlines() if OOM_CLASS in ln or CPU_OOM in ln),
                text.strip().split("\n", 1)[0])
    return line.split(OOM_CLASS, 1)[-1].strip()[:300] or "no message"


class _Latch:
    """Holds the first user error any worker of the run raised."""

    def __init__(self) -> None:
        self.error: UserError | None = None

    def keep(self, error: UserError) -> None:
        if self.error is None:
            self.error = error

    def get(self) -> UserError | None:
        return self.error


def fit_torch_trainer(train_func: Callable[[dict], None], config: dict, **trainer_kwargs):
    """``TorchTrainer(train_func, train_loop_config=config, **trainer_kwargs).fit()``'s result,
    or the ``UserError`` one of its workers raised, raised here after a single try;
    ``KeyboardInterrupt`` after Ctrl-C has aborted the run."""
    with _latch() as latch:
        trainer = _trainer_class()(_ends_on_user_error(train_func),
                                   train_loop_config={**config, _LATCH: latch}, **trainer_kwargs)
        return _fit(trainer, latch)


def _trainer_class():
    """``TorchTrainer`` whose Ctrl-C aborts the run as Ray Train's does and then lets ``fit``
    raise ``KeyboardInterrupt``. Ray's own handler ends the driver with ``sys.exit`` (exit 1,
    not a word of which stage stopped) and stays installed after ``fit`` returns."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        interrupted = False

        def _register_sigint_handler(self, controller) -> None:
            def handler(signum, frame):
                if self.interrupted:  # a second Ctrl-C: stop waiting for the abort
                    raise KeyboardInterrupt
                self.interrupted = True
                controller.abort.remote()

            signal.signal(signal.SIGINT, handler)

    return Trainer


@contextlib.contextmanager
def _latch() -> Iterator[object]:
    """A latch actor for one Ray Train run, killed when the block ends. It takes no CPU and
    lives on the driver's node: a worker's node may be lost, the driver's ends the run anyway."""
    import ray
    latch = ray.remote(num_cpus=0, max_restarts=0)(_Latch).options(
        scheduling_strategy=_drivers_node()).remote()
    try:
        yield latch
    finally:
        with contextlib.suppress(Exception):
            ray.kill(latch)


def _drivers_node():
    """Ray's scheduling strategy for "on the driver's node" (hard: a soft one let Ray place it
    on the node test_two_nodes kills); Ray's default where the driver has no node to name."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    try:
        node = ray.get_runtime_context().get_node_id()
    except Exception:  # a Ray Client driver, say
        return None
    return NodeAffinitySchedulingStrategy(node, soft=False) if node else None


def _ends_on_user_error(train_func: Callable[[dict], None]) -> Callable[[dict], None]:
    """``train_func`` whose ``UserError`` (an out-of-memory error becomes one) is kept in
    ``config[_LATCH]`` before it propagates, and which returns at once when an earlier try of
    the run kept one."""

    @functools.wraps(train_func)
    def run(config: dict) -> None:
        latch = config[_LATCH]
        if _kept(latch) is not None:
            return  # an earlier try failed on bad input: this one would too
        try:
            train_func(config)
        except UserError as err:
            _keep(latch, err)
            raise
        except Exception as err:
            memory = as_memory_error(err)
            if memory is None:
                raise
            _keep(latch, memory)
            raise memory from err
    return run


def _keep(latch, err: UserError) -> None:
    import ray
    with contextlib.suppress(ray.exceptions.RayActorError):
        ray.get(latch.keep.remote(err))


def _kept(latch) -> UserError | None:
    """The kept error; None too when the latch is gone (its node lost: the run goes on with
    Ray Train's own retries, as without a latch)."""
    import ray
    try:
        return ray.get(latch.get.remote())
    except ray.exceptions.RayActorError:
        return None


def _fit(trainer, latch):
    """``trainer.fit()``'s result, or the user error a worker kept (whether Ray Train then
    failed the run or a retry ended at once)."""
    with handler_for(signal.SIGINT):  # fit installs its own
        try:
            result = trainer.fit()
        except Exception as err:
            if getattr(trainer, "interrupted", False):
                raise KeyboardInterrupt from err
            kept = _kept(latch)
            if kept is not None:
                raise kept from err
            raise
    if getattr(trainer, "interrupted", False):
        raise KeyboardInterrupt
    kept = _kept(latch)
    if kept is not None:
        raise kept
    return result
