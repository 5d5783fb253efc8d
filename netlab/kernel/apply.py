"""Apply a plan: turn every value of a ``Plan`` into one kernel object, ledger first.

Two phases (a barrier between them), then files. Which netns are pods and which
infrastructure, and what is made in which order, is the plan's layout
(:func:`netlab.plan.layout.layout`, pure and tested without root); this module carries it out:

1. ``pods`` (:mod:`netlab.kernel.pods`), a pipeline: ``workers - 1`` *makers* create
   pod namespaces (thread unshare + bind mount, :func:`ns.new_netns`), each with a netlink
   socket opened inside it and kept, write the pod's early sysctls, ipsets and iptables, and
   encode its ONE rtnetlink batch: ``lo`` up; its veth, sent from the pod's socket with the
   node end first (made straight in the node netns with a chosen ifindex, up) and the pod's
   end (the plan's peer end) second, then up; its addresses, routes and ip rules. ONE
   *batcher* first creates the infrastructure netns that
   other netns's devices land in (nodes: early ``conf.default.*`` sysctls and ``ip_forward``,
   which set what devices made later start with, then ``lo`` up) and their devices, then the
   devices of the fabric (which a maker creates before its pods), then sends each pod's
   batch through its socket, then the pod's sysctls that name its devices. Meanwhile the
   main thread builds the configure batches (it knows every chosen ifindex).
2. ``configure`` (:mod:`netlab.kernel.configure`): per infrastructure netns, one batch: bring
   up the veth ends other infrastructure netns put there, addresses, routes, ip rules; finish
   the kernel's linkwatch work on the newest pod veths; then sysctls, ipsets (+ entries),
   iptables chains and rules (:mod:`netlab.kernel.netfilter`: one libiptc commit per table).
   Meanwhile the main thread writes the plan file.
3. ``files`` (:mod:`netlab.kernel.hostfiles`): written by the main thread while the configure
   batches run (2,000 files of an in-pod lab took 0.17 s after them). ``processes`` are not
   ours: the runtime starts them and records them with :func:`netlab.kernel.ledger.record_process`.

Measured costs that shaped this (2 vCPUs; bench-up has the totals): the kernel serialises
most of it on the rtnl mutex, and one thread that does nothing but send rtnetlink batches
keeps the mutex busy while the others make namespaces (2-10% faster than workers that each
make whole pods; see PodsPhase._pods_pipeline); that thread is the bottleneck, so it runs as little
Python as we can manage. A pod's veth comes up in its own batch, node end first, although
bringing all node ends up in one configure batch at the end was 4-5% faster: that left the
pods' ends waiting for linkwatch, and pods could not send for seconds after apply returned
(see PodsPhase._open_leaf). Moving the node's addresses and routes into the pods phase was slower.

Each worker enters its netns with :func:`ns.in_netns` (or creates it and stays), opens one
rtnetlink socket *there*, checks its netns cookie against the one recorded when the netns was
made, and sends each section as one batch. Every object is written to the ledger as an intent
before the request that creates it is sent. On any failure the whole lab is rolled back from the
ledger (which is exactly :func:`netlab.kernel.destroy.destroy`) and :class:`ApplyError` names
the object, in its own words (:mod:`netlab.kernel.failures`).

Every object must live in a namespace the plan creates, so rollback and destroy never have to
undo single objects: deleting the namespace removes its devices, routes, rules, iptables and
ipsets at once, and nothing of the lab is ever in the root namespace.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from netlab import netns as ns
from netlab.errors import LabStateError
from netlab.kernel.configure import ConfigurePhase
from netlab.kernel.destroy import destroy, owner_of
from netlab.kernel.failures import ApplyError, ObjectError
from netlab.kernel.hostfiles import write_files
from netlab.kernel.ledger import Ledger
from netlab.kernel.pods import PodsPhase
from netlab.kernel.sysctl import sysctl_path
from netlab.plan.layout import layout
from netlab.plan.types import File, Link, Netns, Plan, Process

__all__ = ["ApplyError", "NetnsTakenError", "Progress", "apply", "default_workers", "sysctl_path", "validate"]

Progress = Callable[[str, int, int], None]


class NetnsTakenError(LabStateError, ValueError):
    """A namespace name of the plan exists already (another lab's, or someone else's)."""


def validate(plan: Plan) -> None:
    """Refuse plans whose objects would live outside the lab's own, fresh namespaces."""
    names = [n.name for n in plan.netns]
    if len(set(names)) != len(names):
        raise ValueError(f"plan {plan.lab!r}: duplicate netns names")
    known = set(names)
    for n in names:
        if not n or "/" in n or n in (".", ".."):
            raise ValueError(f"plan {plan.lab!r}: invalid netns name {n!r}")
    taken = sorted(known & set(ns.list_netns()))
    if taken:
        owner = owner_of(taken[0])
        whose = f"made by lab {owner!r}" if owner else "not made by a netlab lab"
        raise NetnsTakenError(f"lab {plan.lab!r}: network namespace {taken[0]!r} already exists ({whose})"
                              + (f", and {len(taken) - 1} more of its names" if taken[1:] else "")
                              + "; choose another lab name (--name)")
    for o in plan.objects():
        if isinstance(o, (Netns, Process)):
            continue
        if isinstance(o, File):
            if not os.path.isabs(o.path):
                raise ValueError(f"{o.describe()}: path must be absolute")
            continue
        if o.netns not in known:
            raise ValueError(f"{o.describe()}: netns {o.netns!r} is not created by the plan")
        if isinstance(o, Link) and o.kind == "veth" and (o.peer_netns not in known or not o.peer_name):
            raise ValueError(f"{o.describe()}: a veth needs peer_name and a peer_netns created by the plan")


def default_workers() -> int:
    """One pod maker per CPU, plus the batcher (see _pods_pipeline). Measured on 2 vCPUs,
    interleaved runs, ms per pod at 100 / 1000 pods: 2 workers 0.81 / 0.79, 3 workers
    0.77 / 0.74, 4 workers 0.78 / 0.79. (Before the pipeline, with whole pods per worker,
    more workers than CPUs only spun on the rtnl mutex.)"""
    return max(3, min(9, (os.cpu_count() or 2) + 1))


def apply(plan: Plan, *, progress: Progress | None = None, workers: int | None = None,
          keep_lock: bool = False) -> None:
    """Create every kernel object of ``plan``; on failure roll back and raise :class:`ApplyError`.

    ``keep_lock``: the lab stays locked by this process (destroy refuses it) after a good apply,
    until :func:`netlab.kernel.ledger.release_lock`: `up` keeps it while it starts the processes."""
    validate(plan)
    lay = layout(plan)  # (pure: before the ledger, so a bug here leaves nothing to roll back)
    ledger = Ledger.create(plan)
    try:
        _Applier(plan, lay, ledger, progress, workers or default_workers()).run()
        ledger.done(keep_lock=keep_lock)
    except BaseException as e:
        ledger.close()
        rb = ""
        try:
            rep = destroy(plan.lab)
            if rep.errors:
                rb = f" (rollback problems: {'; '.join(rep.errors)})"
        except Exception as e2:  # the original error matters more; say the rollback failed too
            rb = f" (rollback failed: {e2})"
        if not isinstance(e, Exception):
            raise
        msg = str(e) if isinstance(e, (ObjectError, ApplyError)) else f"lab {plan.lab}: {type(e).__name__}: {e}"
        raise ApplyError(msg + rb) from e
    finally:
        ledger.close()


class _Applier(PodsPhase, ConfigurePhase):
    """The phases, in order, on one thread pool."""

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.close()

    def _run(self) -> None:
        self.root_cookie = ns.current_cookie()
        lay = self.layout
        for netns, dev in lay.far_ends:
            self._choose_index(netns, dev)
        # (at least 2: the pods phase runs a maker and the batcher at once, each waiting on the other)
        with ThreadPoolExecutor(max(2, self.workers), thread_name_prefix=f"apply-{self.plan.lab}") as pool:
            def prepare() -> None:  # this thread is idle while the pods are made: it prepares the configure batches
                for c in lay.configure:
                    self._prepare_configure(c)

            def meanwhile() -> None:  # this thread again, while the configure batches are in the kernel
                self._write_plan_when_prepared(len(lay.configure))
                write_files(self.plan.files, self.ledger)  # (every netns exists: /etc/netns/<netns>/ may be made)

            self._pods_pipeline(pool, prepare=prepare)
            self._phase(pool, "configure", [(self._configure, c, c.work.count()) for c in lay.configure],
                        lay.work_count(), meanwhile=meanwhile)
        if self.progress and self.plan.files:
            self.progress("files", len(self.plan.files), len(self.plan.files))
