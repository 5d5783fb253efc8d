"""Apply's configure phase: the rest of each infrastructure netns (fabric, nodes), one task each
(:class:`netlab.plan.layout.InfraConfig`), after the pods phase made every device.

One rtnetlink batch per netns carries, in order, the veth ends other netns created there brought
up, addresses, routes and ip rules; then sysctls, ipsets and iptables. While the pods are made,
the otherwise idle main thread builds these batches (every device index is known by then), and
while they run in the kernel it writes the plan file.
"""

from __future__ import annotations

from netlab import netns as ns
from netlab.kernel import rtnl
from netlab.kernel.applier import ApplierBase, netlink_requests
from netlab.kernel.failures import check, tag
from netlab.kernel.netfilter import write_ipsets, write_iptables
from netlab.kernel.sysctl import write_sysctl
from netlab.plan.layout import InfraConfig, NetnsWork
from netlab.plan.types import Link


class ConfigurePhase(ApplierBase):
    def _write_plan_when_prepared(self, tasks: int) -> None:
        """The plan file, once every configure task has its batch ready (or after a second).

        Why wait: encoding the plan holds the GIL (34 ms at 1000 pods); written while the
        configure tasks build their requests it stalls them, written while their batch is in
        the kernel it costs nothing. destroy needs only the ledger, so nothing waits for it.
        """
        for _ in range(tasks):
            if not self._prepared.acquire(timeout=1.0):
                break
        self.ledger.write_plan(self.plan)

    def _configure(self, cfg: InfraConfig) -> None:
        """Everything but links in an infrastructure netns, through one socket there.

        One rtnetlink batch carries, in order, the veth ends other netns created here (``ups``:
        link, device name) brought up, addresses, routes, ip rules. Then sysctls, ipsets and
        iptables. Nothing in the kernel orders routes after iptables, and one batch saves a
        round trip per section (a node has 1000s of pods). Device indexes come from the ones
        chosen for veth far ends; a dump only when the work names a device made here.
        """
        netns, ups, work = cfg.netns, cfg.ups, cfg.work
        prepared = False
        try:
            with ns.in_netns(netns), self._sock(netns) as r:
                reqs = self._prepped.pop(netns, None)
                if reqs is None:  # the work names a device made here (bridge, tap, geneve)
                    reqs = self._configure_batch(ups, work, r.link_indexes())
                self._prepared.release()
                prepared = True
                if reqs:
                    check(r.batch(reqs))
                self._sync_pod_veths(netns, r)
                self._configure_rest(netns, work)
        finally:
            if not prepared:
                self._prepared.release()

    def _sync_pod_veths(self, netns: str, r: rtnl.Rtnl) -> None:
        """Finish the kernel's linkwatch work on the node ends of the last LINKWATCH_TAIL pod
        veths made into ``netns`` (see PodsPhase._open_leaf): an RTM_GETLINK of each runs it at once if
        it is still pending. Without this, traffic to those pods would be dropped until
        linkwatch comes round. Every pod's carrier-on schedules an immediate linkwatch run
        that takes up to 200 devices, oldest first, so only the newest can still be waiting
        (none was, in runs of 100 and 1000 pods; a dump of 1000 devices to check costs 15 ms)."""
        ends = self._newest_ends.get(netns)
        if ends:
            check(r.batch([tag(rtnl.link_get(i), f"pod veth ends in netns {netns}") for i in ends]))

    def _prepare_configure(self, cfg: InfraConfig) -> None:
        """Write the intents and build the batch of a configure task ahead of time, if every
        device its work names has a chosen ifindex (else the task dumps the netns's devices)."""
        idx = self._chosen.get(cfg.netns, {})
        work = cfg.work
        if any(a.dev not in idx for a in work.addresses) or any(o.dev and o.dev not in idx for o in work.routes):
            return
        self._prepped[cfg.netns] = self._configure_batch(cfg.ups, work, idx)

    def _configure_batch(self, ups: list[tuple[Link, str]], work: NetnsWork,
                         idx: dict[str, int]) -> list[rtnl.Request]:
        """Intents, then the batch: ``ups`` brought up, addresses, routes, ip rules."""
        self.ledger.intent([*work.addresses, *work.routes, *work.rules])
        reqs = [tag(rtnl.link_set(name=dev, up=True), link) for link, dev in ups]
        return reqs + netlink_requests(work, idx)

    def _configure_rest(self, netns: str, work: NetnsWork) -> None:
        """Sysctls, ipsets and iptables of ``netns``, from a thread inside it."""
        for s in work.sysctls:
            self.ledger.intent([s])
            write_sysctl(s)
        if work.ipsets or work.ipset_entries:
            write_ipsets(netns, self.cookies[netns], work.ipsets, work.ipset_entries, self.ledger)
        if work.ipt_chains or work.ipt_rules:
            write_iptables(netns, self.cookies[netns], work.ipt_chains, work.ipt_rules, self.ledger)
