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

PREFIX=iptb
PATHS=raw,boringtun,iptun
ALIASES=(iptun-udp=iptun)
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # namespaces, measuring, iptun, report

WG_S=iptbwgs     # boringtun interface names: must differ, because the UAPI
WG_C=iptbwgc     # socket /var/run/wireguard/NAME.sock is not per-namespace
WG_SOCKS=("/var/run/wireguard/$WG_S.sock" "/var/run/wireguard/$WG_C.sock")
WG_NET_S=10.2.0.1
WG_NET_C=10.2.0.2
WG_PORT=51820
teardown_hook() { rm -f "${WG_SOCKS[@]}"; }

declare -A RSS   # iptun's peak RSS, by end

parse_args "$@"
bench_start

# ---------------------------------------------------------------- tools
if want boringtun; then
    ensure_apt wg wireguard-tools
    export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
    if ! command -v boringtun-cli >/dev/null; then
        log "installing boringtun-cli (cargo install, slow)"
        (cd /tmp && cargo install boringtun-cli --locked) >"$TMP/cargo-install.log" 2>&1
    fi
    BORINGTUN=$(command -v boringtun-cli)
fi
if want iptun; then iptun_setup; fi

netns_up

# ---------------------------------------------------------------- measuring
note_mtu() { # name dev (in the client namespace)
    MTU[$1]=$(ip -n "$NS_C" -o link show dev "$2" | sed -n 's/.* mtu \([0-9]*\).*/\1/p')
}

vmhwm() { awk '/^VmHWM/{printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }

# read while iptun still runs (measure_iptun_udp's hook)
iptun_udp_extras() {
    note_mtu iptun-udp $IPTUN_TUN
    RSS[server]=$(vmhwm "$IT_S")
    RSS[client]=$(vmhwm "$IT_C")
}

# 1. raw veth
if want raw; then
    measure_raw
    note_mtu "raw veth" "$VETH_C"
fi

# 2. boringtun
if want boringtun; then
    pause
    log "boringtun: $WG_NET_C -> $WG_NET_S over udp $UL_S:$WG_PORT ($BORINGTUN)"
    umask 077
    wg genkey >"$TMP/wg-s.key"; wg pubkey <"$TMP/wg-s.key" >"$TMP/wg-s.pub"
    wg genkey >"$TMP/wg-c.key"; wg pubkey <"$TMP/wg-c.key" >"$TMP/wg-c.pub"
    umask 022
    rm -f "${WG_SOCKS[@]}"
    bg "$NS_S" "$TMP/boringtun-server.log" env WG_SUDO=1 "$BORINGTUN" --foreground --disable-drop-privileges $WG_S
    BT_S=$BG_PID
    bg "$NS_C" "$TMP/boringtun-client.log" env WG_SUDO=1 "$BORINGTUN" --foreground --disable-drop-privileges $WG_C
    BT_C=$BG_PID
    for _ in $(seq 100); do
        [[ -S ${WG_SOCKS[0]} && -S ${WG_SOCKS[1]} ]] && break
        kill -0 $BT_S 2>/dev/null && kill -0 $BT_C 2>/dev/null || die "boringtun-cli exited"
        sleep 0.1
    done
    [[ -S ${WG_SOCKS[0]} && -S ${WG_SOCKS[1]} ]] || die "boringtun UAPI sockets missing"
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
    measure boringtun "ping_avg $NS_C $WG_NET_S" "iperf3_mbit $NS_C $WG_NET_S boringtun"
    note_mtu boringtun $WG_C
    stop_pids $BT_S $BT_C
    rm -f "${WG_SOCKS[@]}"
fi

# 3. iptun over UDP
if want iptun; then measure_iptun_udp iptun_udp_extras; fi

# ---------------------------------------------------------------- report
print_table 11 0 "vs_raw:raw veth:8:3" "vs_boringtun:boringtun:13:2"
if [[ -n ${RSS[server]:-} ]]; then
    echo "iptun peak RSS (VmHWM): server ${RSS[server]} MiB, client ${RSS[client]} MiB"
fi
echo "(runs=$RUNS, best of; iperf3 ${DURATION}s single TCP stream client->server; ${PINGS} pings at 0.2 s; $(nproc) cores)"

rss_json=""
if [[ -n ${RSS[server]:-} ]]; then
    rss_json=$(printf ',"iptun_vmhwm_mib":{"server":"%s","client":"%s"}' "${RSS[server]}" "${RSS[client]}")
fi
write_json "" "$rss_json"
