"""Getting a dask ``Client``: in-process (default), local worker processes, SLURM, or an address.

* ``cluster="local"``, ``workers=None``: one in-process worker (threads), as cheap as it gets.
* ``cluster="local"``, ``workers=N``: a ``LocalCluster`` of N worker *processes* on this machine,
  listening on 127.0.0.1 only, each with ``threads`` task threads (default ``cores // N``) and
  torch/BLAS intra-op threads set so that the workers together use ``cores`` threads.
* ``cluster="local"``, ``gpus="all"|"N"|"0,2"``: one worker process per GPU, each seeing only its
  own device (``CUDA_VISIBLE_DEVICES``; dask-cuda's ``LocalCUDACluster`` when the optional ``gpu``
  extra is installed), worker resource ``GPU=1``, on 127.0.0.1 only.
* ``cluster="slurm"``: a dask-jobqueue ``SLURMCluster`` from a YAML profile (one worker per GPU job,
  ``--gres=gpu:1`` and worker resource ``GPU=1``), optionally TLS-secured.
* ``scheduler="tcp://..."`` or ``"tls://..."``: connect to a running scheduler (TLS files for tls://).

Nothing listens on a public interface unless a profile names one explicitly.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
from distributed import LocalCluster, WorkerPlugin
from pydantic import BaseModel, ConfigDict, Field

from quietscope.errors import ConfigError, validation_message
from quietscope.runner.heap import heap_env

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---- thread budget -------------------------------------------------------------------------
def thread_budget(
    n_workers: int, threads: int | None = None, cores: int | None = None, torch_threads: int | None = None
) -> tuple[int, int]:
    """``(task threads per worker, torch/BLAS threads per task)`` so N workers use ``cores`` cores.

    Each worker gets ``cores // N`` cores (at least 1). By default they all go to task threads
    (blocks in flight: reading/writing one block overlaps computing another) with one intra-op
    thread each; ``threads`` fewer task threads leave ``(cores // N) // threads`` intra-op threads
    to each task instead. ``torch_threads`` overrides the intra-op count (small convolutions
    often run faster on one thread than on two that contend with I/O).
    """
    cores = cores or cpu_count()
    per_worker = max(1, cores // max(1, n_workers))
    task_threads = threads or per_worker
    return task_threads, torch_threads or max(1, per_worker // task_threads)


class TorchThreadsPlugin(WorkerPlugin):
    """Worker plugin: set torch's intra-op threads in each worker process (and for its restarts)."""

    name = "quietscope-torch-threads"

    def __init__(self, n_threads: int) -> None:
        self.n_threads = int(n_threads)

    def setup(self, worker: Any) -> None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(self.n_threads)
        # torch reads OMP_NUM_THREADS when first imported; set it directly only if already loaded
        # (importing torch here would slow down the start of filter-only workers).
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(self.n_threads)

    def teardown(self, worker: Any) -> None:
        pass


def _torch_plugin(n_threads: int) -> TorchThreadsPlugin:
    return TorchThreadsPlugin(n_threads)


# ---- TLS -----------------------------------------------------------------------------------
def make_security(tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> Any | None:
    """A ``distributed.Security`` requiring TLS from CA/certificate/key files (all three or none)."""
    given = [v for v in (tls_ca, tls_cert, tls_key) if v]
    if not given:
        return None
    if len(given) != 3:
        raise ConfigError("TLS needs all of --tls-ca, --tls-cert and --tls-key (or tls_ca/tls_cert/tls_key in the profile)")
    for name, p in (("--tls-ca", tls_ca), ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if not Path(str(p)).is_file():
            raise ConfigError(f"{name} {p!r} is not a file; give the PEM file's path")
    from distributed.security import Security

    return Security(
        tls_ca_file=str(tls_ca),
        tls_client_cert=str(tls_cert),
        tls_client_key=str(tls_key),
        tls_scheduler_cert=str(tls_cert),
        tls_scheduler_key=str(tls_key),
        tls_worker_cert=str(tls_cert),
        tls_worker_key=str(tls_key),
        require_encryption=True,
    )


# ---- SLURM profile -------------------------------------------------------------------------
class ClusterProfile(BaseModel):
    """``--cluster-profile FILE`` (YAML): a SLURM GPU cluster, one dask worker per GPU job."""

    model_config = ConfigDict(extra="forbid")

    queue: str | None = None
    account: str | None = None
    walltime: str = "04:00:00"
    cores: int = Field(8, ge=1, description="CPU cores per job (= per GPU worker)")
    memory: str = "32GB"
    gpus: int = Field(1, ge=0, le=1, description="GPUs per job: 1 (one worker per GPU) or 0 (CPU workers)")
    jobs: int = Field(1, ge=1, description="jobs (= workers) to start")
    interface: str | None = Field(None, description="network interface for scheduler and workers, e.g. ib0")
    scheduler_host: str | None = Field(None, description="address the scheduler binds (instead of interface)")
    scheduler_port: int = Field(0, ge=0)
    dashboard_address: str = f"{LOOPBACK}:0"
    local_directory: str | None = None
    python: str | None = None
    job_extra_directives: list[str] = Field(default_factory=list)
    job_script_prologue: list[str] = Field(default_factory=list)
    worker_extra_args: list[str] = Field(default_factory=list)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


def load_profile(path: str | Path) -> ClusterProfile:
    """Parse and validate a YAML cluster profile."""
    import yaml


    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--cluster-profile {str(path)!r} does not exist; give a YAML file (see docs/cluster.md)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--cluster-profile {str(path)!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--cluster-profile {str(path)!r} must be a YAML mapping of options (see docs/cluster.md)")
    data = data.get("slurm", data)
    base = p.parent
    for k in ("tls_ca", "tls_cert", "tls_key"):  # relative paths are relative to the profile
        if data.get(k) and not Path(data[k]).is_absolute():
            data[k] = str(base / data[k])
    try:
        return ClusterProfile(**data)
    except Exception as exc:
        raise ConfigError(f"--cluster-profile {str(path)!r}: {validation_message(exc)}") from None


def slurm_cluster(profile: ClusterProfile, security: Any | None = None) -> Any:
    """A (not yet scaled) ``dask_jobqueue.SLURMCluster`` for ``profile``; ``.job_script()`` shows the job."""
    from dask_jobqueue import SLURMCluster

    if not (profile.interface or profile.scheduler_host):
        raise ConfigError(
            "the SLURM profile must say where the scheduler listens: 'interface: ib0' (a cluster-internal "
            "network) or 'scheduler_host: <address>'; quietscope never picks a public interface by itself"
        )
    security = security or make_security(profile.tls_ca, profile.tls_cert, profile.tls_key)
    n_threads, torch_threads = profile.cores, 1 if profile.gpus else profile.cores
    directives = list(profile.job_extra_directives)
    worker_args = list(profile.worker_extra_args)
    if profile.gpus:
        directives.append(f"--gres=gpu:{profile.gpus}")
        worker_args += ["--resources", "GPU=1"]
    heap = [f"export {k}={v}" for k, v in heap_env().items()]  # glibc reads it at start (runner/heap.py)
    prologue = [f"export OMP_NUM_THREADS={torch_threads}", *heap, *profile.job_script_prologue]
    sched: dict[str, Any] = {"dashboard_address": profile.dashboard_address, "port": profile.scheduler_port}
    if profile.scheduler_host:
        sched["host"] = profile.scheduler_host
    kwargs: dict[str, Any] = dict(
        queue=profile.queue,
        account=profile.account,
        walltime=profile.walltime,
        cores=n_threads,
        processes=1,
        memory=profile.memory,
        job_extra_directives=directives,
        job_script_prologue=prologue,
        worker_extra_args=worker_args,
        scheduler_options=sched,
        silence_logs="error",
    )
    if profile.interface:
        kwargs["interface"] = profile.interface
    if profile.local_directory:
        kwargs["local_directory"] = profile.local_directory
    if profile.python:
        kwargs["python"] = profile.python
    if security is not None:
        kwargs["security"] = security
        kwargs["protocol"] = "tls://"
    return SLURMCluster(**kwargs)


# ---- the client ----------------------------------------------------------------------------
class ClusterOptions(BaseModel):
    """Where the blocks run: the options of :func:`client_for` (validated at the edge)."""

    model_config = ConfigDict(extra="forbid")

    scheduler: str | None = Field(None, description="address of a running scheduler (tcp:// or tls://)")
    threads: int | None = Field(None, ge=1, description="task threads (per worker process with workers)")
    cluster: str = Field("local", pattern="^(local|slurm)$", description="local (this machine) or slurm (dask-jobqueue)")
    workers: int | None = Field(None, ge=1, description="local: worker processes; slurm: jobs (one GPU each)")
    profile: str | None = Field(None, description="SLURM profile (YAML)")
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker process")
    gpus: str | None = Field(None, description="local: one worker process per GPU: all, a count N, or indices 0,2")
    precision: str = Field("auto", pattern="^(auto|fp32|bf16|fp16)$",
                           description="network precision: auto (fp32 on the CPU, bf16 on a GPU that has it), fp32, bf16, fp16")


@contextmanager
def dask_client(scheduler: str | None = None, threads: int | None = None, **options: Any) -> Iterator[Any]:
    """Yield a ``distributed.Client``; keyword form of :func:`client_for` (fields of
    :class:`ClusterOptions`)."""
    with client_for(ClusterOptions(scheduler=scheduler, threads=threads, **options)) as client:
        yield client


def check_gpus_local(options: ClusterOptions) -> None:
    """``--gpus`` starts workers on this machine: refuse it with a scheduler address or SLURM."""
    if options.gpus and (options.scheduler or options.cluster != "local"):
        raise ConfigError("--gpus starts GPU workers on this machine; with --scheduler or --cluster slurm the GPUs "
                          "are the remote workers' (one per SLURM job): leave --gpus out")


@contextmanager
def client_for(options: ClusterOptions) -> Iterator[Any]:
    """Yield a ``distributed.Client`` for ``options`` (see the module docstring for the kinds).

    Parameters
    ----------
    options : ClusterOptions
        Scheduler address, or local/SLURM cluster settings.

    Yields
    ------
    distributed.Client
        Closed (with its cluster) when the block exits.

    Raises
    ------
    ConfigError
        Unknown cluster kind, TLS files missing for tls://, an unreachable scheduler, or SLURM
        without a profile.
    """
    if options.cluster not in ("local", "slurm"):
        raise ConfigError(f"--cluster {options.cluster!r} is unknown; use local or slurm")
    prof = load_profile(options.profile) if options.profile else None
    security = make_security(
        options.tls_ca or (prof.tls_ca if prof else None),
        options.tls_cert or (prof.tls_cert if prof else None),
        options.tls_key or (prof.tls_key if prof else None),
    )
    check_gpus_local(options)
    if options.scheduler:
        opened = _remote_client(options.scheduler, security)
    elif options.cluster == "slurm":
        opened = _slurm_client(options, prof, security)
    else:
        opened = _local_client(options)
    client, owned = opened
    try:
        yield client
    finally:
        client.close()
        if owned is not None:
            owned.close()


def _remote_client(scheduler: str, security: Any | None) -> tuple[Any, None]:
    from distributed import Client

    if scheduler.startswith("tls://") and security is None:
        raise ConfigError(f"--scheduler {scheduler} uses TLS: give --tls-ca, --tls-cert and --tls-key")
    try:
        client = Client(scheduler, timeout="20s", security=security)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach the dask scheduler at {scheduler!r} ({exc}); check the address (and TLS files)") from None
    log.info("connected to scheduler %s (%d workers)", scheduler, len(client.scheduler_info()["workers"]))
    return client, None


def _slurm_client(options: ClusterOptions, prof: ClusterProfile | None, security: Any | None) -> tuple[Any, Any]:
    from distributed import Client

    if prof is None:
        raise ConfigError("--cluster slurm needs --cluster-profile FILE (YAML; see docs/cluster.md)")
    jobs = options.workers or prof.jobs
    slurm = slurm_cluster(prof, security)
    client = Client(slurm, security=security)
    client.register_plugin(_torch_plugin(1 if prof.gpus else prof.cores))
    slurm.scale(jobs=jobs)
    log.info("SLURM cluster: %d job(s) of %d cores%s; dashboard %s", jobs, prof.cores,
             ", 1 GPU each" if prof.gpus else "", slurm.dashboard_link)
    try:
        client.wait_for_workers(1, timeout=None)
    except BaseException:
        client.close()
        slurm.close()
        raise
    return client, slurm


def _local_client(options: ClusterOptions) -> tuple[Any, Any]:
    from distributed import Client, LocalCluster

    # distributed always starts HTTP servers; never expose them on a public interface.
    common = dict(host=LOOPBACK, dashboard_address=f"{LOOPBACK}:0", worker_dashboard_address=f"{LOOPBACK}:0",
                  silence_logs=logging.WARNING)
    if options.gpus:
        return _local_gpu_client(options, common)
    if options.workers:
        task_threads, torch_threads = thread_budget(options.workers, options.threads, torch_threads=options.torch_threads)
        env = {v: str(torch_threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        # The nanny applies ``env`` inside the started worker, after glibc has read its variables;
        # only its pre-spawn environment is there at start (the nannies read it when created).
        spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ", default={}), **heap_env()}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn}):
            local = LocalCluster(n_workers=options.workers, threads_per_worker=task_threads, processes=True, env=env,
                                 **common)
        client = Client(local)
        client.register_plugin(_torch_plugin(torch_threads))
        log.info("local cluster: %d worker processes x %d threads, %d torch thread(s) each; on %s only; dashboard %s",
                 options.workers, task_threads, torch_threads, LOOPBACK, local.dashboard_link)
        return client, local
    n_threads = options.threads or 2
    common.pop("host")
    local = LocalCluster(n_workers=1, threads_per_worker=n_threads, processes=False, **common)
    client = Client(local)
    log.info("local in-process dask cluster: 1 worker, %d threads (HTTP on %s only)", n_threads, LOOPBACK)
    return client, local


def gpu_resources(client: Any) -> bool:
    """Whether any worker of ``client`` declares a ``GPU`` resource (tasks then request GPU=1)."""
    return any((w.get("resources") or {}).get("GPU", 0) >= 1 for w in worker_info(client).values())


def worker_info(client: Any) -> dict[str, Any]:
    """All workers' info (recent distributed lists only the first few by default)."""
    try:
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # older distributed
        return client.scheduler_info()["workers"]


# ---- one worker per GPU on this machine ------------------------------------------------------
def cuda_device_count() -> int:
    """GPUs torch can use in this process (0 without a CUDA build or driver)."""
    import torch  # external; imported here so that filter-only clients never load it

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_gpus() -> list[str]:
    """The GPUs this process can use, as ``CUDA_VISIBLE_DEVICES`` entries (index ``i`` = ``cuda:i``).

    When ``CUDA_VISIBLE_DEVICES`` is set (e.g. by SLURM for an allocation), its first
    :func:`cuda_device_count` entries; otherwise ``0 .. count-1``.
    """
    n = cuda_device_count()
    env = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return env[:n] if env else [str(i) for i in range(n)]


def resolve_gpus(spec: str, available: list[str] | None = None) -> list[str]:
    """The devices of ``--gpus``: ``all``, a count ``N`` (the first N), or indices ``0,2``.

    Parameters
    ----------
    spec : str
        ``all``, ``N`` or a comma-separated list of indices into the visible GPUs (``cuda:i``
        numbering; ``1,`` is the single GPU 1).
    available : list of str, optional
        Visible GPUs as ``CUDA_VISIBLE_DEVICES`` entries (default: :func:`visible_gpus`).

    Returns
    -------
    list of str
        One ``CUDA_VISIBLE_DEVICES`` value per worker, all distinct.

    Raises
    ------
    ConfigError
        No GPU is visible, or the spec asks for GPUs that are not there.

    Examples
    --------
    >>> resolve_gpus("0,2", ["4", "5", "7"])
    ['4', '7']
    """
    gpus = visible_gpus() if available is None else list(available)
    text = str(spec).strip().lower()
    if not gpus:
        raise ConfigError(f"--gpus {spec}: no CUDA GPU is visible here (torch sees none); leave --gpus out to run on "
                          "the CPU, or install a CUDA build of torch (docs/cluster.md)")
    if text == "all":
        return gpus
    if "," not in text:
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"--gpus {spec!r} is not all, a count N or indices like 0,2")
        if int(text) > len(gpus):
            raise ConfigError(f"--gpus {spec}: only {len(gpus)} GPU(s) are visible; use --gpus all or a smaller count")
        return gpus[: int(text)]
    try:
        idx = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--gpus {spec!r} is not all, a count N or indices like 0,2") from None
    bad = [i for i in idx if not 0 <= i < len(gpus)]
    if bad or not idx or len(set(idx)) != len(idx):
        raise ConfigError(f"--gpus {spec}: indices must be distinct and in 0..{len(gpus) - 1} ({len(gpus)} GPU(s) visible)")
    return [gpus[i] for i in idx]


class PinnedGPUCluster(LocalCluster):
    """A ``LocalCluster`` with one worker process per GPU, pinned by ``CUDA_VISIBLE_DEVICES``.

    What dask-cuda's ``LocalCUDACluster`` does, without its dependency (NVML): worker ``i`` gets
    ``CUDA_VISIBLE_DEVICES=devices[i]`` in its nanny's environment (set before the process
    starts, so CUDA never initialises on another GPU; a restarted worker gets the same one) and
    the resource ``GPU=1``.
    """

    def __init__(self, devices: list[str], **kwargs: Any) -> None:
        self.devices = list(devices)
        super().__init__(n_workers=0, processes=True, **kwargs)
        self.scale(len(self.devices))

    def new_worker_spec(self) -> dict[Any, dict[str, Any]]:
        (name, spec), = super().new_worker_spec().items()
        spec = copy.deepcopy(spec)
        options = spec.setdefault("options", {})
        options["env"] = {**(options.get("env") or {}), "CUDA_VISIBLE_DEVICES": self.devices[int(name) % len(self.devices)]}
        options["resources"] = {**(options.get("resources") or {}), "GPU": 1}
        return {name: spec}


def worker_device() -> str:
    """Run in a worker: the GPU it sees (``CUDA_VISIBLE_DEVICES``, and the device's name)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
    torch = sys.modules.get("torch")
    name = ""
    if torch is not None and torch.cuda.is_available():
        name = f", cuda:0 = {torch.cuda.get_device_name(0)}"
    return f"CUDA_VISIBLE_DEVICES={visible}{name}"


def _gpu_cluster(devices: list[str], task_threads: int, env: dict[str, str], common: dict[str, Any]) -> Any:
    try:
        from dask_cuda import LocalCUDACluster  # optional dependency: the `gpu` extra
    except ImportError:
        return PinnedGPUCluster(devices, threads_per_worker=task_threads, env=env, **common)
    # dask-cuda rotates the list per worker (worker i sees devices[i] as cuda:0) and binds
    # each worker to the CPU cores and network card nearest its GPU.
    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(devices), n_workers=len(devices),
                            threads_per_worker=task_threads, resources={"GPU": 1}, **common)


def _local_gpu_client(options: ClusterOptions, common: dict[str, Any]) -> tuple[Any, Any]:
    from distributed import Client

    devices = resolve_gpus(str(options.gpus))
    if options.workers and options.workers != len(devices):
        raise ConfigError(f"--workers {options.workers} and --gpus {options.gpus} ({len(devices)} GPUs) disagree: "
                          "--gpus starts one worker per GPU; leave --workers out")
    # One block task at a time per GPU (GPU=1); the other threads run the pyramid tasks.
    task_threads, torch_threads = thread_budget(len(devices), options.threads, torch_threads=options.torch_threads)
    env = {v: str(torch_threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    local = _gpu_cluster(devices, task_threads, env, common)
    client = Client(local)
    try:
        client.wait_for_workers(len(devices), timeout=300)
        client.register_plugin(_torch_plugin(torch_threads))
        seen = client.run(worker_device)
    except BaseException:
        client.close()
        local.close()
        raise
    log.info("local GPU cluster (%s): %d worker processes x %d threads, resource GPU=1 each; on %s only; dashboard %s",
             type(local).__name__, len(devices), task_threads, LOOPBACK, local.dashboard_link)
    for addr, dev in sorted(seen.items()):
        log.info("  worker %s: %s", addr, dev)
    return client, local
