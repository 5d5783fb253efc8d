"""A namespace's ipsets and iptables, written by apply from a thread inside the namespace.

Both check the namespace of the socket they write through against the cookie recorded when the
namespace was made (the ipset socket with ``SO_NETNS_COOKIE``, libiptc's in :class:`ipt.TableTx`),
record their objects in the ledger first, and name the object the kernel refused.

A table whose content was written in another netns before (an in-pod lab's pods all get the
same three) is written from that table's image in one ``IPT_SO_SET_REPLACE``, not through
libiptc (:mod:`netlab.kernel.iptimage`); the first of its kind, and any that does not fit an
image, goes through libiptc as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from netlab import netns as ns
from netlab.kernel import ipsetnl, ipt, iptimage, rtnl
from netlab.kernel.failures import ApplyError, ObjectError
from netlab.kernel.ledger import Ledger
from netlab.plan.types import IpSet, IpSetEntry, IptChain, IptRule


def write_ipsets(netns: str, cookie: int, sets: Sequence[IpSet], entries: Sequence[IpSetEntry],
                 ledger: Ledger) -> None:
    """Create ``sets``, then add ``entries`` in one batch, through one nfnetlink socket made
    here, in this netns (checked); :mod:`netlab.kernel.ipsetnl` says why not pyroute2."""
    with rtnl.Rtnl(ipsetnl.NETLINK_NETFILTER) as nl:
        nl.assert_in(cookie, f"ipset socket in netns {netns}")
        for s in sets:
            ledger.intent([s])
            try:
                ipsetnl.create_set(nl, s.name, s.type, s.comment)
            except rtnl.NetlinkError as e:
                raise ObjectError(s, ipsetnl.explain(e)) from e
        if not entries:
            return
        ledger.intent(list(entries))
        failed = nl.batch([ipsetnl.add(e.set, e.ip, e.comment, tag=e) for e in entries])
    if failed:
        req, err = failed[0]
        raise ObjectError(req.tag, ipsetnl.explain(err))


def write_iptables(netns: str, cookie: int, chains: Sequence[IptChain], rules: Sequence[IptRule],
                   ledger: Ledger) -> None:
    """Per table, every chain (and its jump) then every rule, in plan order, in one commit."""
    tables: dict[str, tuple[list[IptChain], list[IptRule]]] = {}
    for c in chains:
        tables.setdefault(c.table, ([], []))[0].append(c)
    for rl in rules:
        tables.setdefault(rl.table, ([], []))[1].append(rl)
    where = f"in netns {netns}"
    for table, (cs, rs) in tables.items():
        ledger.intent([*cs, *rs])
        # the same table as in a pod before (an in-pod lab's every pod): its image, one write
        key = iptimage.image_key(table, cs, rs)
        before = None
        if key is not None:
            try:
                if iptimage.replace(table, key, cookie, where):
                    continue
                before = iptimage.table_state(table, cookie, where)
            except OSError as e:
                if isinstance(e, ns.NetnsError):
                    raise
                before = None  # the libiptc way below names what the kernel refuses
        with ipt.locked():
            try:
                _table(netns, cookie, table, cs, rs, commit_each=False)
            except (ObjectError, ns.NetnsError):
                raise
            except Exception as e:
                # the kernel refused the table as a whole at commit: redo it one commit per
                # object to name the one it rejects (the netns is ours: partial state is fine)
                _table(netns, cookie, table, cs, rs, commit_each=True)
                raise ApplyError(f"iptables -t {table} in netns {netns}: commit failed: {e}") from e
        if key is not None and before is not None:
            try:
                iptimage.capture(table, key, before, cookie, where)
            except OSError as e:
                if isinstance(e, ns.NetnsError):
                    raise


def _table(netns: str, cookie: int, table: str, cs: list[IptChain], rs: list[IptRule], *, commit_each: bool) -> None:
    """All chains (+ their jumps) then all rules of one table, in plan order, in one commit
    (or, when hunting a commit failure, one commit each)."""
    where = f"in netns {netns}"
    tx = ipt.TableTx(table, cookie, where)
    try:
        objs: list[IptChain | IptRule] = [*cs, *rs]
        for obj in objs:
            try:
                if isinstance(obj, IptChain):
                    tx.create_chain(obj.chain)
                    if obj.jump_from:
                        tx.insert_jump(obj.jump_from, obj.chain)
                else:
                    tx.append(obj.chain, obj.spec)
            except Exception as e:
                raise ObjectError(obj, e) from e
            if commit_each:
                try:
                    tx.commit()
                except ns.NetnsError:
                    raise
                except Exception as e:
                    raise ObjectError(obj, e) from e
                tx.close()
                tx = ipt.TableTx(table, cookie, where)
        if not commit_each:
            tx.commit()
    finally:
        tx.close()
