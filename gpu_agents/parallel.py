"""One job across several devices: the device group an agent runs on, and the parallel modes of a denoiser.

No Kafka here. An agent group is N processes, one per device, started together by torchrun (gpu_agents/group.py).
Rank 0 is the agent the scheduler sees; the other ranks compute beside it and follow its decisions. Two channels
join them, both torch.distributed process groups:

* the device channel (NCCL on GPUs, gloo on CPUs) carries the tensors of a step: Ulysses' all-to-alls inside
  attention, the CFG passes' all-gather;
* the control channel (gloo, always: small Python objects) carries rank 0's decisions — load this model, run this
  job from this state, go on or stop after this step, exit — and a heartbeat while the group is idle.

Every collective has a deadline (``timeout_s``). A rank that dies closes its connections, and the others' next
collective fails at once; one that hangs fails them at the deadline. Either way the group is broken (GroupBroken):
its ranks exit and the group is restarted as a whole, and the job resumes from its newest checkpoint elsewhere,
exactly as after the death of a one-device agent.

The modes (a setting: auto, ulysses, cfg):

* **ulysses** (degree N): diffusers' context parallelism. Each rank holds the whole model; between the attention
  layers each holds 1/N of the token sequence, and attention swaps sequence shards for head shards (all-to-all), so
  activations shrink N-fold and the transformer's work is shared. Needs heads divisible by N. Measured on CPU: Wan
  2.1/2.2 and Helios give exactly the one-device result; Wan TI2V-5B differs by at most ~2e-6, because its
  per-token timesteps are embedded shard by shard (other matrix shapes, other rounding).
* **cfg** (degree 2): a guided step's conditional pass on rank 0 and unconditional pass on rank 1, then one
  all-gather: the same operations as on one device, so bit-identical. A job without guidance runs its one pass on
  both ranks (correct, no faster).
* **auto**: cfg for a group of two and a model under ULYSSES_FROM_PARAMS parameters (one exchange per step, about
  twice the speed where guidance is on), else ulysses (large models: the activations must be split to fit).
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .families.base import Denoiser, ModelFacts, ModelPass
from .models import ModelCatalogue

log = logging.getLogger(__name__)

MODES = ("ulysses", "cfg")
#: auto picks Ulysses from this many transformer parameters up (a Wan 14B expert; the 1.3B and 5B models fit one
#: device and gain most from CFG parallelism's single exchange per step).
ULYSSES_FROM_PARAMS = 10_000_000_000
#: While no job runs, rank 0 tells the others it is alive this often (they give up after the group's timeout).
HEARTBEAT_S = 1.0


class GroupBroken(RuntimeError):
    """A collective of the group failed (a rank died, or missed the deadline): the group cannot go on."""


class ParallelModeError(ValueError):
    """A model cannot run in this group (its family has no parallel mode that fits, heads not divisible...)."""


@dataclass(frozen=True)
class Message:
    """Rank 0's word to the other ranks on the control channel."""

    kind: str  # "idle" (heartbeat) | "load" (model_id) | "run" (a job: payload) | "exit"
    payload: Any = None


class SoloDevice:
    """A one-device agent, seen as a group of one: every exchange is a no-op."""

    rank, size, leader, broken = 0, 1, True, None

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device

    def broadcast(self, obj: Any = None) -> Any:
        return obj

    def describe(self) -> str:
        return "one device"


class DeviceGroup:
    """This process's place in an agent group, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT)."""

    def __init__(self, timeout_s: float, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.rank, self.size = int(env["RANK"]), int(env["WORLD_SIZE"])
        self.leader = self.rank == 0
        self.timeout = timedelta(seconds=timeout_s)
        self.broken: str | None = None
        store = self._store(env)
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(env.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", store=store, rank=self.rank, world_size=self.size, timeout=self.timeout,
                                    device_id=self.device)
            self.control = dist.new_group(backend="gloo", timeout=self.timeout)
        else:
            self.device = torch.device("cpu")
            dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.size, timeout=self.timeout)
            self.control = dist.group.WORLD

    def _store(self, env) -> dist.Store:
        """The rendezvous store, its keys prefixed by torchrun's restart count: torchrun keeps its store across
        restarts of a group, and a restarted rank must not read the addresses its dead predecessors left there."""
        agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts it; else rank 0 does
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), self.size,
                              is_master=self.leader and not agent_store, timeout=self.timeout)
        return dist.PrefixStore(f"vidgen/restart-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} on {self.device}"

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (the others pass nothing and wait for it, up to the timeout)."""
        box = [obj]
        with self._collective("broadcast"):
            dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), by rank."""
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(self.size)]
        with self._collective("all_gather"):
            dist.all_gather(gathered, tensor)
        gathered[self.rank] = tensor
        return gathered

    def _collective(self, name: str):
        group = self

        class Guard:
            def __enter__(self):
                if group.broken:
                    raise GroupBroken(group.broken)

            def __exit__(self, kind, exc, tb):
                if isinstance(exc, (RuntimeError, dist.DistError)) and not isinstance(exc, GroupBroken):
                    group.broken = f"{name} failed on {group.describe()}: {exc}"
                    raise GroupBroken(group.broken) from exc

        return Guard()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class GroupLeader:
    """Rank 0's side of the control channel: one exchange at a time (a job holds the channel from its start to its
    end), and a heartbeat while none runs, so the other ranks can tell an idle leader from a dead one."""

    def __init__(self, group: DeviceGroup | SoloDevice, on_broken: Callable[[str], None]) -> None:
        self.group = group
        self.on_broken = on_broken
        self.channel = threading.Lock()
        self.closed = threading.Event()
        if group.size > 1:
            threading.Thread(target=self._heartbeat, name="group-heartbeat", daemon=True).start()

    def send(self, kind: str, payload: Any = None) -> Any:
        """Tell the other ranks (call holding ``channel``). Raises GroupBroken when they cannot hear it."""
        return self.group.broadcast(Message(kind, payload))

    def decide(self, decision: Any) -> Any:
        """A decision inside a job (stop or go on after this step): every rank acts on the same one."""
        return self.group.broadcast(decision)

    def _heartbeat(self) -> None:
        """While idle; a job's own exchanges tell it of a broken group, the heartbeat tells an idle leader."""
        while not self.closed.wait(HEARTBEAT_S):
            if self.channel.acquire(blocking=False):
                try:
                    if not self.closed.is_set() and not self.group.broken:
                        self.send("idle")
                except GroupBroken as exc:
                    self.on_broken(str(exc))
                    return
                finally:
                    self.channel.release()

    def close(self) -> None:
        """The leader leaves: the other ranks are told to exit (unless the group is broken already)."""
        with self.channel:
            self.closed.set()
            if self.group.size > 1 and not self.group.broken:
                try:
                    self.send("exit")
                except GroupBroken:
                    pass


def follow(group: DeviceGroup, load: Callable[[str], None], run: Callable[[Any, Callable[[], Any]], None]) -> None:
    """A rank other than 0: do what rank 0 says until it says exit. ``load(model_id)`` loads (and parallelises) a
    model; ``run(payload, next_decision)`` runs a job's steps, calling ``next_decision()`` after each step for rank
    0's word on it. Returns on exit; raises GroupBroken when rank 0 is gone."""
    while True:
        message: Message = group.broadcast()
        if message.kind == "exit":
            return
        if message.kind == "load":
            load(message.payload)
        elif message.kind == "run":
            run(message.payload, group.broadcast)


# --------------------------------------------------------------------------------------------------
# Parallel modes
# --------------------------------------------------------------------------------------------------


def choose_mode(setting: str, facts: ModelFacts, group_size: int, parameters: int | None = None) -> str:
    """The mode a model runs in on a group of ``group_size``: the setting, or (auto) by model size.
    Raises ParallelModeError when the model's family has no mode that fits."""
    if not facts.parallel_modes:
        raise ParallelModeError(f"model {facts.model_id!r} ({facts.family}) runs on one device only: its family has no "
                                "parallel mode; give it a one-device agent")
    if setting == "auto":
        big = parameters is not None and parameters >= ULYSSES_FROM_PARAMS
        setting = "cfg" if group_size == 2 and not big and "cfg" in facts.parallel_modes else "ulysses"
    if setting not in facts.parallel_modes:
        raise ParallelModeError(f"model {facts.model_id!r} ({facts.family}) has no {setting} mode "
                                f"(it has {', '.join(facts.parallel_modes)})")
    if setting == "cfg" and group_size != 2:
        raise ParallelModeError(f"CFG parallelism splits a step's two passes over exactly 2 ranks, not {group_size}")
    return setting


class ParallelModels:
    """One rank's models, each set up once in its parallel mode; on a group of one, models as they are."""

    def __init__(self, models: ModelCatalogue, group: DeviceGroup | SoloDevice, setting: str) -> None:
        self.models, self.group, self.setting = models, group, setting
        self.modes: dict[str, str] = {}

    def check(self, model_id: str) -> str | None:
        """Rank 0, before the other ranks hear of the model: its mode on this group, or ParallelModeError."""
        if self.group.size == 1:
            return None
        if model_id in self.modes:
            return self.modes[model_id]
        denoiser = self.models.denoiser(model_id)  # loading alone involves no other rank
        mode = choose_mode(self.setting, self.models.facts(model_id), self.group.size, parameter_count(denoiser))
        if mode == "ulysses":
            for module in denoiser.modules():
                heads = module.config.get("num_attention_heads")
                if heads is not None and heads % self.group.size:
                    raise ParallelModeError(f"Ulysses over {self.group.size} ranks needs attention heads divisible "
                                            f"by {self.group.size}; model {model_id!r} has {heads}")
        return mode

    def load(self, model_id: str, leader: "GroupLeader") -> Denoiser:
        """Rank 0 (holding the channel): the model, set up on every rank of the group."""
        if self.group.size > 1 and model_id not in self.modes:
            mode = self.check(model_id)
            leader.send("load", (model_id, mode))
            self.setup(model_id, mode)
        return self.models.denoiser(model_id)

    def setup(self, model_id: str, mode: str) -> None:
        """Every rank at once (Ulysses builds its device mesh collectively)."""
        parallelize(self.models.denoiser(model_id), self.group, mode)
        self.modes[model_id] = mode
        log.info("model %s runs in %s mode on %s", model_id, mode, self.group.describe())


def parameter_count(denoiser: Denoiser) -> int:
    return sum(p.numel() for p in denoiser.transformer.parameters())


def parallelize(denoiser: Denoiser, group: DeviceGroup, mode: str) -> None:
    """Make ``denoiser`` run one job across the group in ``mode``. Every rank calls it, at the same point (Ulysses
    sets up its device mesh collectively)."""
    if mode == "cfg":
        denoiser.passes = CfgParallelPasses(group)
        return
    from diffusers import ContextParallelConfig

    for module in denoiser.modules():
        module.enable_parallelism(config=ContextParallelConfig(ulysses_degree=group.size),
                                  cp_plan=denoiser.context_parallel_plan(module))


class CfgParallelPasses:
    """A guided step's passes on two ranks: conditional on rank 0, unconditional on rank 1, then each rank has
    both. Each pass is computed exactly as on one device (same inputs, same shapes), so the guided result is too."""

    def __init__(self, group: DeviceGroup) -> None:
        self.group = group

    def __call__(self, run: ModelPass, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if negative_prompt_embeds is None:  # no guidance: the one pass, on both ranks
            return run(prompt_embeds, "cond"), None
        mine = run(prompt_embeds, "cond") if self.group.rank == 0 else run(negative_prompt_embeds, "uncond")
        cond, uncond = self.group.all_gather(mine)
        return cond, uncond
