"""Istio datapath constants, named as in the references of ``shared/reference/``.

Every mark, mask, table, VNI, port, device name and tunnel address the lab uses comes from
here, so that "where does 0x210 come from" has one answer. Two datapaths, two references:

* Istio 1.18.2 (``istio-1.18-datapath.md``, the seed's): the first part of this module;
  section numbers (§) and cite keys (CNI-CONST, ZT-NODE, ...) are that reference's;
* the in-pod redirection of Istio 1.30.3 (``istio-inpod-datapath.md``): the part headed
  "in-pod", whose § and cite keys (CFG, IPT, NA, ZPOD, ...) are that reference's.
"""

from __future__ import annotations

# --- §1.2 packet marks on the node (value == mask, "MARK --set-xmark V/V") [CNI-CONST] ---
OUTBOUND_MARK = 0x100  # TCP from an enrolled pod -> table 101 -> istioout
SKIP_MARK = 0x200  # use main-table routing (ip rule 100)
CONN_SKIP_MARK = 0x220  # skip, saved to connmark so the reverse direction skips too
PROXY_MARK = 0x210  # ztunnel sending with a spoofed (pod) source IP; saved to connmark
PROXY_RET_MARK = 0x040  # return traffic of a 0x210 connection -> table 102 -> ZT_VETH
OUTPUT_SKIP_MARK = 0x220  # ztunnel-OUTPUT: "--set-mark 0x220", i.e. --set-xmark 0x220/0xffffffff
FULL_MASK = 0xFFFFFFFF  # what a mask-less "--set-mark V" means: iptables-save prints V/0xffffffff

# --- §1.6 / §1.7 node policy routing [CNI-NODE, ZT-NODE] ---
RULE_PRIO_SKIP = 100  # fwmark 0x200/0x200 goto 32766
RULE_PRIO_OUTBOUND = 101  # fwmark 0x100/0x100 lookup 101
RULE_PRIO_PROXY = 102  # fwmark 0x040/0x040 lookup 102
RULE_PRIO_INBOUND = 103  # all lookup 100
RULE_PRIO_MAIN = 32766  # the kernel's "from all lookup main" rule (target of goto)
ROUTE_TABLE_INBOUND = 100
ROUTE_TABLE_OUTBOUND = 101
ROUTE_TABLE_PROXY = 102

# --- §1.3 / §2.1 geneve tunnels [CNI-CONST, CNI-NODE, CNI-ZTNS] ---
INBOUND_TUN = "istioin"
OUTBOUND_TUN = "istioout"
INBOUND_TUN_POD = "pistioin"  # inside the ztunnel netns
OUTBOUND_TUN_POD = "pistioout"
INBOUND_TUN_VNI = 1000
OUTBOUND_TUN_VNI = 1001
INBOUND_TUN_IP = "192.168.126.1"  # node end of istioin
ZTUNNEL_INBOUND_TUN_IP = "192.168.126.2"  # ztunnel end (pistioin)
OUTBOUND_TUN_IP = "192.168.127.1"  # node end of istioout
ZTUNNEL_OUTBOUND_TUN_IP = "192.168.127.2"  # ztunnel end (pistioout)
TUN_PREFIX_LEN = 30
GENEVE_DST_PORT = 6081  # kernel default dstport (RFC 8926)
GENEVE_PROTO_TEB = 0x6558  # Ethernet payload (ETH_P_TEB)
# Outer IPv4 (20) + UDP (8) + Geneve (8) + inner Ethernet (14): what a kernel geneve device
# subtracts from the underlay MTU when it derives its own (GENEVE_IPV4_HLEN + ETH_HLEN); the
# plan gives a TAP the same MTU (netlab.geneve.wire checks the sum against its header sizes).
GENEVE_IPV4_OVERHEAD = 50

# --- §1.4 ipset [CNI-OPT] ---
ZTUNNEL_PODS_IPSET = "ztunnel-pods-ips"

# --- §1.5 iptables chain names [CNI-CONST] ---
CHAIN_ZT_PREROUTING = "ztunnel-PREROUTING"
CHAIN_ZT_POSTROUTING = "ztunnel-POSTROUTING"
CHAIN_ZT_OUTPUT = "ztunnel-OUTPUT"
CHAIN_ZT_INPUT = "ztunnel-INPUT"
CHAIN_ZT_FORWARD = "ztunnel-FORWARD"

# --- §2.2 / §2.3 inside the ztunnel netns [CNI-ZTNS, ZT-POD] ---
TPROXY_MARK = 0x400  # --tproxy-mark 0x400/0xfff
TPROXY_MASK = 0xFFF
ORG_SRC_RET_MARK = 0x4D3  # 1235: packets for ztunnel's spoofed sockets arriving over eth0
ORG_SRC_RET_MASK = 0xFFF  # CNI-CONST OrgSrcRetMask: --set-xmark 0x4d3/0xfff
ZT_RULE_PRIO_TPROXY = 20000  # fwmark 0x400/0xfff lookup 100
ZT_RULE_PRIO_ORG_SRC_RET = 20003  # fwmark 0x4d3/0xfff lookup 100
ZT_POD_IF = "eth0"

# --- §4.1 ztunnel ports [ZT-CFG] ---
ZTUNNEL_OUTBOUND_PORT = 15001
ZTUNNEL_INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008
ZTUNNEL_SOCKS5_PORT = 15080
ZTUNNEL_ADMIN_PORT = 15000
ZTUNNEL_METRICS_PORT = 15020
READINESS_PORT = 15021
DNS_CAPTURE_PORT = 15053  # not implemented in ztunnel 1.18; the DNAT rule is left out (§9)
TPROXY_ON_IP = "127.0.0.1"

# --- §6 sidecar (istio-iptables, REDIRECT mode) [IPT, INJ] ---
SIDECAR_OUTBOUND_PORT = 15001
SIDECAR_INBOUND_PORT = 15006
PROXY_UID = 1337
PROXY_GID = 1337
INBOUND_PASSTHROUGH_SRC = "127.0.0.6"  # Envoy's inbound upstream bind address
SIDECAR_EXCLUDED_INBOUND_PORTS = (15090, 15021, 15020)  # -d 15090,15021 + status port 15020
ENVOY_PROMETHEUS_PORT = 15090
PILOT_AGENT_STATUS_PORT = 15020
CHAIN_ISTIO_INBOUND = "ISTIO_INBOUND"
CHAIN_ISTIO_REDIRECT = "ISTIO_REDIRECT"
CHAIN_ISTIO_IN_REDIRECT = "ISTIO_IN_REDIRECT"
CHAIN_ISTIO_OUTPUT = "ISTIO_OUTPUT"

# --- §3 / §7 labels and annotations [CNI-INF, HELM] ---
LABEL_DATAPLANE_MODE = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
LABEL_INJECTION = "istio-injection"
INJECTION_ENABLED = "enabled"
LABEL_TUNNEL = "networking.istio.io/tunnel"  # "http" => sidecar speaks HBONE (native_hbone)
ANNOTATION_REDIRECTION = "ambient.istio.io/redirection"
LABEL_FOR_SERVICE_ACCOUNT = "istio.io/for-service-account"  # waypoint scoped to one SA (§7)
ISTIO_SYSTEM_NS = "istio-system"
ZTUNNEL_SA = "ztunnel"

# --- §5.1 HBONE [ZT-TLS, ZT-PROXY] ---
TRUST_DOMAIN = "cluster.local"
DEFAULT_SA = "default"
DEFAULT_CLUSTER_NAME = "Kubernetes"
HBONE_ALPN = "h2"
HBONE_WINDOW = 4 * 1024 * 1024  # stream and connection window
HBONE_MAX_FRAME = 1024 * 1024
CONNECT_TIMEOUT_S = 10.0  # ztunnel freebind_connect
WAYPOINT_CONNECT_TIMEOUT_S = 2.0  # Envoy connect_originate cluster


# =====================================================================================
# in-pod redirection, Istio 1.30.3 / ztunnel 1.30.3 (shared/reference/istio-inpod-datapath.md)
# =====================================================================================

# --- the lab's two datapaths (topology key ``datapath``, ``--datapath``) ---
DATAPATH_1_18 = "istio-1.18"  # the seed's: node Geneve tunnels into the ztunnel pod
DATAPATH_INPOD = "inpod"  # current Istio: rules inside each pod's netns, ztunnel listens there
DATAPATHS = (DATAPATH_1_18, DATAPATH_INPOD)

# --- §1.1 marks, masks, table and ip rule [CFG L30-35, IPT-NL L59-65] ---
INPOD_MARK = 0x539  # 1337: ztunnel's PACKET_MARK, SO_MARK on every socket it makes in a pod
INPOD_MASK = 0xFFF
INPOD_TPROXY_MARK = 0x111  # (conn)mark of connections ztunnel's sockets looped over lo (§1.7)
INPOD_TPROXY_MASK = 0xFFF
INPOD_RESTORE_MASK = 0xFFFFFFFF  # --restore-mark --nfmask/--ctmask
INPOD_RULE_PRIO = 32764  # ip rule fwmark 0x111/0xfff lookup 100
INPOD_ROUTE_TABLE = 100  # local 0.0.0.0/0 dev lo
ZTUNNEL_DNS_PORT = DNS_CAPTURE_PORT  # §3.2: 15053 UDP+TCP on 127.0.0.1 inside each enrolled pod
DNS_CT_ZONE = 1  # raw-table CT --zone for ztunnel's DNS (istio#33469)
DNS_PORT = 53

# --- §1.1 / §2.1 host probes [NA options.go L31-32] ---
HOST_PROBE_SNAT_IP = "169.254.7.127"
HOST_PROBE_SNAT_IPV6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
INPOD_PROBES_IPSET_V4 = "istio-inpod-probes-v4"  # hash:ip, enrolled pods of the node, comment = UID

# --- §1.3 / §2.1 chain names [IPT L39] (ISTIO_OUTPUT: the sidecar's name above, reused) ---
CHAIN_ISTIO_PRERT = "ISTIO_PRERT"
CHAIN_ISTIO_POSTRT = "ISTIO_POSTRT"

# --- §1.8 / §2.3 pod labels and annotations [NA net.go L27-58, SEL] ---
ANNOTATION_BYPASS_INBOUND_CAPTURE = "ambient.istio.io/bypass-inbound-capture"
ANNOTATION_DNS_CAPTURE = "ambient.istio.io/dns-capture"
DATAPLANE_MODE_NONE = "none"  # pod label istio.io/dataplane-mode=none: never enrolled
LABEL_USE_WAYPOINT = "istio.io/use-waypoint"  # on a Service or Namespace (§3.6)
TUNNEL_HTTP = "http"  # networking.istio.io/tunnel value the ambient profile's injector sets (§4.2)

# --- §4.2 sidecars under istio-cni (CNI-plugin mode) [SC-CNI] ---
SIDECAR_CNI_EXCLUDED_INBOUND_PORTS = (15020, 15021, 15090)  # appended and deduplicated, in this order
SIDECAR_CNI_EXCLUDED_OUTBOUND_PORT = 15020  # tcp and udp RETURN

# --- §3.1 ZDS (zds.proto, package istio.workload.zds) [ZPOD protocol.rs] ---
ZDS_VERSION_V1 = 1

# --- the lab's kube-dns stand-in (docs/deviations.md, "inpod") ---
KUBE_SYSTEM_NS = "kube-system"
KUBE_DNS_NAME = "kube-dns"
CLUSTER_DOMAIN = "cluster.local"


def spiffe_id(namespace: str, service_account: str, trust_domain: str = TRUST_DOMAIN) -> str:
    """SPIFFE identity in the format ztunnel 1.18 uses (ZT-TLS identity/manager.rs)."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def mark(value: int) -> str:
    """iptables-save spelling of a value==mask mark, e.g. ``0x200/0x200``."""
    return f"{value:#x}/{value:#x}"
