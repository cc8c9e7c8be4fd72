#!/usr/bin/env bash
# bench/udp.sh - throughput and RTT of iptun over UDP, compared in one run with
# the raw veth path and with boringtun (userspace WireGuard).
#
# Usage (as root):
#   bench/udp.sh                       # raw veth, boringtun, iptun-udp
#   bench/udp.sh --only raw,boringtun  # any subset of: raw,boringtun,iptun
#
# Environment:
#   IPTUN=path     iptun binary (default: <repo>/target/release/iptun; built
#                  with `cargo build --release -p iptun` when missing)
#   RUNS=n         measure each path n times, keep the best (default 1)
#   DURATION=s     iperf3 seconds per measurement (default 10)
#   PINGS=n        pings per measurement, 0.2 s apart (default 20)
#   PAUSE=s        idle seconds between measurements (default 3)
#   JSON=file      also write the results there as JSON
#   KEEP_LOGS=1    keep the temp dir with logs (it is kept on failure anyway)
#
# Topology: netns iptb-s (192.0.2.1/24) <-veth-> netns iptb-c (192.0.2.2/24).
# All tunnels run over that one link; iperf3 -s runs in iptb-s, the iperf3
# client in iptb-c (client -> server direction). Nothing leaves the namespaces.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NS_S=iptb-s
NS_C=iptb-c
UL_S=192.0.2.1   # server underlay address
UL_C=192.0.2.2   # client underlay address
WG_S=iptbwgs     # boringtun interface names: must differ, because the UAPI
WG_C=iptbwgc     # socket /var/run/wireguard/NAME.sock is not per-namespace
WG_NET_S=10.2.0.1
WG_NET_C=10.2.0.2
WG_PORT=51820
IPTUN_TUN=iptun0
IPTUN_ADDR_S=10.1.0.1
IPTUN_PORT=3000

RUNS=${RUNS:-1}
DURATION=${DURATION:-10}
PINGS=${PINGS:-20}
PAUSE=${PAUSE:-3}
ONLY=raw,boringtun,iptun

while [[ $# -gt 0 ]]; do
    case $1 in
        --only) ONLY=${2:?--only needs a list}; shift 2 ;;
        --only=*) ONLY=${1#--only=}; shift ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done
ONLY=${ONLY//iptun-udp/iptun}
for w in ${ONLY//,/ }; do
    case $w in raw|boringtun|iptun) ;; *) echo "--only: unknown path '$w' (raw,boringtun,iptun)" >&2; exit 2 ;; esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }

[[ $EUID -eq 0 ]] || { echo "must run as root" >&2; exit 1; }

log() { echo "[udp.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

TMP=$(mktemp -d /tmp/iptb.XXXXXX)
PIDS=()

kill_ns_procs() {
    local ns=$1 p
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
}

teardown() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
    PIDS=()
    for ns in "$NS_C" "$NS_S"; do
        if ip netns list | grep -qw "$ns"; then
            kill_ns_procs "$ns"
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    rm -f /var/run/wireguard/$WG_S.sock /var/run/wireguard/$WG_C.sock
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ $rc -ne 0 ]]; then
        log "failed (exit $rc); logs in $TMP:"
        for f in "$TMP"/*.log; do
            [[ -e $f ]] || continue
            echo "----- $(basename "$f") (last 40 lines) -----" >&2
            tail -n 40 "$f" >&2
        done
    fi
    teardown
    if [[ $rc -eq 0 && -z ${KEEP_LOGS:-} ]]; then rm -rf "$TMP"; else log "logs kept in $TMP"; fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- tools
ensure_apt() { # cmd package
    command -v "$1" >/dev/null && return
    log "installing $2"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "$2" >"$TMP/apt.log" 2>&1 || {
        apt-get update -qq >>"$TMP/apt.log" 2>&1
        apt-get install -y -qq "$2" >>"$TMP/apt.log" 2>&1
    }
}
ensure_apt iperf3 iperf3
ensure_apt ping iputils-ping
ensure_apt python3 python3
want boringtun && ensure_apt wg wireguard-tools

if want boringtun; then
    export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
    if ! command -v boringtun-cli >/dev/null; then
        log "installing boringtun-cli (cargo install, slow)"
        (cd /tmp && cargo install boringtun-cli --locked) >"$TMP/cargo-install.log" 2>&1
    fi
    BORINGTUN=$(command -v boringtun-cli)
fi

if want iptun; then
    IPTUN=${IPTUN:-$ROOT/target/release/iptun}
    if [[ ! -x $IPTUN ]]; then
        log "$IPTUN missing: cargo build --release -p iptun"
        (cd "$ROOT" && cargo build --release -p iptun) >"$TMP/cargo-build.log" 2>&1
    fi
    [[ -x $IPTUN ]] || die "no iptun binary at $IPTUN"
    IPTUN=$(readlink -f "$IPTUN")
fi

# ---------------------------------------------------------------- topology
teardown   # stale namespaces / processes from an earlier run
ip netns add "$NS_S"
ip netns add "$NS_C"
ip link add iptb-veth-s netns "$NS_S" type veth peer name iptb-veth-c netns "$NS_C"
ip -n "$NS_S" addr add $UL_S/24 dev iptb-veth-s
ip -n "$NS_C" addr add $UL_C/24 dev iptb-veth-c
for ns in "$NS_S" "$NS_C"; do
    ip -n "$ns" link set lo up
done
ip -n "$NS_S" link set iptb-veth-s up
ip -n "$NS_C" link set iptb-veth-c up

# background process in a namespace; sets BG_PID (ip netns exec execs, so the
# PID is the program's own)
bg() { # ns logfile cmd...
    local ns=$1 logf=$2; shift 2
    ip netns exec "$ns" "$@" >"$logf" 2>&1 &
    BG_PID=$!
    PIDS+=("$BG_PID")
}

bg "$NS_S" "$TMP/iperf3-server.log" iperf3 -s
IPERF_S_PID=$BG_PID
for _ in $(seq 50); do
    ip netns exec "$NS_S" ss -ltn 2>/dev/null | grep -q ':5201 ' && break
    kill -0 "$IPERF_S_PID" 2>/dev/null || die "iperf3 -s exited"
    sleep 0.1
done
# underlay reachable (also fills the neighbour cache)
ip netns exec "$NS_C" ping -c 1 -W 2 $UL_S >/dev/null || die "veth $UL_C -> $UL_S not reachable"

# ---------------------------------------------------------------- measuring
ping_avg() { # ns dst -> avg RTT ms
    local out
    out=$(ip netns exec "$1" ping -q -c "$PINGS" -i 0.2 -W 2 "$2" 2>&1) || { echo "$out" >&2; return 1; }
    sed -n 's#^rtt [^=]*= [0-9.]*/\([0-9.]*\)/.*#\1#p' <<<"$out"
}

iperf_mbit() { # ns dst tag -> Mbit/s received
    local js="$TMP/iperf3-$3.json"
    timeout $((DURATION + 30)) ip netns exec "$1" iperf3 -c "$2" -t "$DURATION" -J >"$js" 2>&1 \
        || { cat "$js" >&2; return 1; }
    python3 - "$js" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
if "error" in d:
    sys.exit("iperf3: " + d["error"])
print("%.1f" % (d["end"]["sum_received"]["bits_per_second"] / 1e6))
EOF
}

declare -A MBIT RTT MTU RSS
ORDER=()

measure() { # name dst mtu-dev mtu-ns
    local name=$1 dst=$2 best_m=0 best_r="" m r i
    for i in $(seq "$RUNS"); do
        r=$(ping_avg "$NS_C" "$dst") || die "$name: ping $dst failed"
        m=$(iperf_mbit "$NS_C" "$dst" "$name-$i") || die "$name: iperf3 to $dst failed"
        log "$name run $i: $m Mbit/s, rtt avg $r ms"
        awk -v a="$m" -v b="$best_m" 'BEGIN{exit !(a>b)}' && best_m=$m
        if [[ -z $best_r ]] || awk -v a="$r" -v b="$best_r" 'BEGIN{exit !(a<b)}'; then best_r=$r; fi
        if [[ $i -lt $RUNS ]]; then sleep "$PAUSE"; fi
    done
    MBIT[$name]=$best_m
    RTT[$name]=$best_r
    MTU[$name]=$(ip -n "$4" -o link show dev "$3" | sed -n 's/.* mtu \([0-9]*\).*/\1/p')
    ORDER+=("$name")
}

wait_ipv4() { # ns dev seconds pid
    local t
    for t in $(seq $(($3 * 10))); do
        ip -n "$1" -4 addr show dev "$2" 2>/dev/null | grep -q 'inet ' && return 0
        kill -0 "$4" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

alive() { kill -0 "$1" 2>/dev/null || echo " (process exited)"; }

stop_pids() {
    local p
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    for p in "$@"; do wait "$p" 2>/dev/null || true; done
    local keep=() q
    for q in "${PIDS[@]}"; do [[ " $* " == *" $q "* ]] || keep+=("$q"); done
    PIDS=("${keep[@]}")
}

first=1
pause() { if [[ $first -eq 1 ]]; then first=0; else sleep "$PAUSE"; fi; }

# 1. raw veth
if want raw; then
    pause
    log "raw veth: $UL_C -> $UL_S"
    measure "raw veth" $UL_S iptb-veth-c "$NS_C"
fi

# 2. boringtun
if want boringtun; then
    pause
    log "boringtun: $WG_NET_C -> $WG_NET_S over udp $UL_S:$WG_PORT ($BORINGTUN)"
    umask 077
    wg genkey >"$TMP/wg-s.key"; wg pubkey <"$TMP/wg-s.key" >"$TMP/wg-s.pub"
    wg genkey >"$TMP/wg-c.key"; wg pubkey <"$TMP/wg-c.key" >"$TMP/wg-c.pub"
    umask 022
    rm -f /var/run/wireguard/$WG_S.sock /var/run/wireguard/$WG_C.sock
    bg "$NS_S" "$TMP/boringtun-server.log" env WG_SUDO=1 "$BORINGTUN" --foreground --disable-drop-privileges $WG_S
    BT_S=$BG_PID
    bg "$NS_C" "$TMP/boringtun-client.log" env WG_SUDO=1 "$BORINGTUN" --foreground --disable-drop-privileges $WG_C
    BT_C=$BG_PID
    for _ in $(seq 100); do
        [[ -S /var/run/wireguard/$WG_S.sock && -S /var/run/wireguard/$WG_C.sock ]] && break
        kill -0 $BT_S 2>/dev/null && kill -0 $BT_C 2>/dev/null || die "boringtun-cli exited"
        sleep 0.1
    done
    [[ -S /var/run/wireguard/$WG_S.sock && -S /var/run/wireguard/$WG_C.sock ]] || die "boringtun UAPI sockets missing"
    ip netns exec "$NS_S" wg set $WG_S private-key "$TMP/wg-s.key" listen-port $WG_PORT \
        peer "$(cat "$TMP/wg-c.pub")" allowed-ips $WG_NET_C/32
    ip netns exec "$NS_C" wg set $WG_C private-key "$TMP/wg-c.key" \
        peer "$(cat "$TMP/wg-s.pub")" endpoint $UL_S:$WG_PORT allowed-ips $WG_NET_S/32
    ip -n "$NS_S" addr add $WG_NET_S/24 dev $WG_S
    ip -n "$NS_C" addr add $WG_NET_C/24 dev $WG_C
    ip -n "$NS_S" link set $WG_S mtu 1420 up
    ip -n "$NS_C" link set $WG_C mtu 1420 up
    # first packet triggers the handshake; give it a few tries
    ip netns exec "$NS_C" ping -c 5 -i 0.2 -W 2 $WG_NET_S >/dev/null 2>&1 || \
        ip netns exec "$NS_C" ping -c 1 -W 3 $WG_NET_S >/dev/null || die "boringtun: no ping through tunnel"
    measure boringtun $WG_NET_S $WG_C "$NS_C"
    stop_pids $BT_S $BT_C
    rm -f /var/run/wireguard/$WG_S.sock /var/run/wireguard/$WG_C.sock
fi

# 3. iptun over UDP
if want iptun; then
    pause
    log "iptun-udp: client -> $IPTUN_ADDR_S over udp $UL_S:$IPTUN_PORT ($IPTUN)"
    umask 077
    "$IPTUN" genkey >"$TMP/iptun-s.key"; "$IPTUN" pubkey <"$TMP/iptun-s.key" >"$TMP/iptun-s.pub"
    "$IPTUN" genkey >"$TMP/iptun-c.key"; "$IPTUN" pubkey <"$TMP/iptun-c.key" >"$TMP/iptun-c.pub"
    umask 022
    bg "$NS_S" "$TMP/iptun-server.log" "$IPTUN" server --private-key "$TMP/iptun-s.key" \
        --allow "$(cat "$TMP/iptun-c.pub")" --listen udp://0.0.0.0:$IPTUN_PORT --tun $IPTUN_TUN
    IT_S=$BG_PID
    wait_ipv4 "$NS_S" $IPTUN_TUN 10 $IT_S || die "iptun server: no IPv4 on $IPTUN_TUN within 10 s$(alive $IT_S)"
    bg "$NS_C" "$TMP/iptun-client.log" "$IPTUN" client --private-key "$TMP/iptun-c.key" \
        --server-key "$(cat "$TMP/iptun-s.pub")" --server udp://$UL_S:$IPTUN_PORT --tun $IPTUN_TUN
    IT_C=$BG_PID
    wait_ipv4 "$NS_C" $IPTUN_TUN 10 $IT_C || die "iptun client: no IPv4 on $IPTUN_TUN within 10 s$(alive $IT_C)"
    log "iptun client address: $(ip -n "$NS_C" -4 -o addr show dev $IPTUN_TUN | awk '{print $4}')"
    ip netns exec "$NS_C" ping -c 5 -i 0.2 -W 2 $IPTUN_ADDR_S >/dev/null 2>&1 || \
        ip netns exec "$NS_C" ping -c 1 -W 3 $IPTUN_ADDR_S >/dev/null || die "iptun: no ping through tunnel"
    measure iptun-udp $IPTUN_ADDR_S $IPTUN_TUN "$NS_C"
    kill -0 $IT_S 2>/dev/null && kill -0 $IT_C 2>/dev/null || die "iptun exited during the measurement"
    hwm() { awk '/^VmHWM/{printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
    RSS[server]=$(hwm $IT_S)
    RSS[client]=$(hwm $IT_C)
    stop_pids $IT_S $IT_C
fi

# ---------------------------------------------------------------- report
raw=${MBIT[raw veth]:-}
bt=${MBIT[boringtun]:-}
echo
printf '%-11s %9s %8s %8s %13s %6s\n' path Mbit/s rtt_ms vs_raw vs_boringtun mtu
for n in "${ORDER[@]}"; do
    awk -v n="$n" -v m="${MBIT[$n]}" -v r="${RTT[$n]}" -v raw="$raw" -v bt="$bt" -v mtu="${MTU[$n]}" 'BEGIN{
        vr = raw == "" ? "-" : sprintf("%.3f", m / raw)
        vb = bt  == "" ? "-" : sprintf("%.2f", m / bt)
        printf "%-11s %9.0f %8.3f %8s %13s %6s\n", n, m, r, vr, vb, mtu }'
done
if [[ -n ${RSS[server]:-} ]]; then
    echo "iptun peak RSS (VmHWM): server ${RSS[server]} MiB, client ${RSS[client]} MiB"
fi
echo "(runs=$RUNS, best of; iperf3 ${DURATION}s single TCP stream client->server; ${PINGS} pings at 0.2 s; $(nproc) cores)"

if [[ -n ${JSON:-} ]]; then
    {
        printf '{"runs":%s,"duration_s":%s,"paths":{' "$RUNS" "$DURATION"
        sep=""
        for n in "${ORDER[@]}"; do
            printf '%s"%s":{"mbit_s":%s,"rtt_ms":%s,"mtu":%s}' "$sep" "$n" "${MBIT[$n]}" "${RTT[$n]}" "${MTU[$n]:-null}"
            sep=","
        done
        printf '}'
        [[ -n ${RSS[server]:-} ]] && printf ',"iptun_vmhwm_mib":{"server":"%s","client":"%s"}' "${RSS[server]}" "${RSS[client]}"
        printf '}\n'
    } >"$JSON"
fi
