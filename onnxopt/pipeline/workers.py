"""Where sweep candidates run: a local process pool or Ray tasks; each worker gets the model bytes, the scoring
arrays and one candidate's steps.
"""
from __future__ import annotations

import multiprocessing

import onnx

from ..errors import UsageError


def execute(shared: tuple, each_steps: list, *, jobs: int, ray: str | None, progress, label: str) -> list[dict]:
    """`run_candidate(*shared, steps)` for each of `each_steps`, results in order: in a local process pool of
    `jobs` workers, or as Ray tasks on the cluster at `ray` (an address, or 'auto')."""
    if ray is not None:
        return execute_on_ray(shared, each_steps, ray, progress, label)
    # Workers are not forked from this process: after onnxruntime or numba started their OpenMP threads a forked
    # child aborts ('fork() called from a process already using GNU OpenMP'). The forkserver forks them from a
    # clean server process (spawn where there is none).
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(max(1, jobs))
    try:
        pending = [pool.apply_async(run_candidate, (*shared, steps)) for steps in each_steps]
        done = (p.get() for p in pending)  # in order: the bar moves as the oldest unfinished candidate ends
        results = list(progress(done, label) if progress else done)
    except BaseException:
        # a signal (SIGTERM, Ctrl-C) or a failed candidate: stop now, not after the queue (which took minutes)
        pool.terminate()
        raise
    finally:
        pool.close()
        pool.join()
    return results


def _check_reachable(address: str) -> None:
    """Fail in seconds on an address where nothing listens (Ray itself retries for minutes)."""
    import socket

    if address == "local":
        return
    given = address
    try:
        if address == "auto":  # the cluster `ray start` last recorded here, or RAY_ADDRESS; it may be gone since
            from ray._private.services import canonicalize_bootstrap_address_or_die

            address = canonicalize_bootstrap_address_or_die("auto")
        host, sep, port = address.split("://")[-1].rpartition(":")
        if not sep:
            raise ValueError("expected host:port, 'auto' or 'local'")
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:  # ConnectionError is an OSError
        raise UsageError(f"--ray {given}: no Ray cluster answers at {address} ({str(exc).splitlines()[0]})") from None


def execute_on_ray(shared: tuple, each_steps: list, address: str, progress, label: str) -> list[dict]:
    """Ray tasks on an existing cluster. What every task shares (the model bytes, the scoring arrays) is put in
    the object store once; each task ships only its steps. One CPU is reserved per task."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'onnxopt[ray]'") from None
    if not ray.is_initialized():
        _check_reachable(address)
        _connect(ray, address)
    task = ray.remote(num_cpus=1, max_retries=0)(run_candidate)
    refs = [ray.put(a) for a in shared]
    pending = [task.remote(*refs, steps) for steps in each_steps]
    done = _in_order(ray, pending)
    try:
        return list(progress(done, label) if progress else done)
    except BaseException:
        # a signal or a failed candidate: the cluster would run the rest of the queue for nobody. Not a forced
        # cancel (which kills the worker): one of a task whose reply is arriving trips a fatal check in Ray 2.60's
        # core worker ("Tried to complete task that was not pending", exit 1 instead of 143; 2 of 9 runs here). A
        # plain cancel drops queued tasks and interrupts running ones; 8 of 8 runs exited 143.
        _, running = ray.wait(pending, num_returns=len(pending), timeout=0)
        for ref in running:
            ray.cancel(ref)
        raise


def _in_order(ray, pending: list):
    """The tasks' results in order (the bar moves as the oldest unfinished task ends). A SIGTERM or SIGINT raised
    inside Ray's compiled calls surfaces as a SystemError, so while waiting here a signal is only recorded, and
    raised again between waits, where this process's own handler turns it into Terminated or KeyboardInterrupt."""
    import signal
    import threading

    received: list[int] = []
    watched = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in watched}
    try:
        for ref in pending:
            while not received and not ray.wait([ref], timeout=0.25)[0]:
                pass
            if received:
                break
            yield ray.get(ref)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        signal.raise_signal(received[0])


def _connect(ray, address: str) -> None:
    """ray.init, keeping this process's SIGTERM handler: Ray replaces it with one that dumps a stack and exits 1,
    so a terminated sweep skipped its cleanup (cancelling the tasks, exit 143)."""
    import signal
    import threading

    in_main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if in_main else None
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--ray {address}: cannot connect to a Ray cluster ({first})") from None
    finally:
        if in_main and handler is not None:
            signal.signal(signal.SIGTERM, handler)


def run_candidate(source_bytes: bytes, gate: dict, scoring: dict, steps: list) -> dict:
    """One candidate, in a worker: the steps, then score, size and FLOPs against the input model. `scoring`: the
    data as arrays ("data": inputs and labels) and the input model's outputs on it ("outputs"), computed once by
    the caller. "layers": what each changed layer had and has (params, FLOPs)."""
    from ..graph.flops import model_flops
    from ..measure.scores import Scorer
    from ..report import Report
    from . import registry
    from . import steps as pipeline_steps

    source = onnx.load_model_from_string(source_bytes)
    model, merged = source, Report(command="sweep")
    for command, options in steps:
        groups = registry.parse(command, {**options, **gate})
        model, report = pipeline_steps.run(model, registry.command(command).rewrite(groups, None, source),
                                     Report(command=command))
        merged.merge(report)
    score = Scorer(source, scoring["data"], gate.get("labels"), outputs=scoring["outputs"]).drop(model)
    layers = [{k: getattr(x, k) for k in ("name", "params_before", "params_after", "flops_before", "flops_after")}
              for x in merged.changed]
    return {"model": model.SerializeToString(), "score": score, "size": model.ByteSize(),
            "flops": model_flops(model)[0], "layers": layers}


def scoring_arrays(scorer, labels: str | None) -> dict:
    """What every worker needs to score a candidate, as arrays (a Ray node may not see the caller's files)."""
    data = dict(scorer.feeds)
    if scorer.labels is not None:
        data[labels or "label"] = scorer.labels
    return {"data": data, "outputs": scorer.outputs}
