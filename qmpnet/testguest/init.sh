#!/bin/sh
# /init of the qmpnet test guest (busybox sh, PID 1) and its in-guest agent.
#
# The guest exists to show tests what Linux sees of the NICs that qmpnet plugs in. It boots, loads the NIC
# driver modules listed in /etc/testguest/modules (written by build.py, one "name [parameters]" a line, in
# insmod order), and runs the agent on the second serial port, /dev/ttyS1, which QEMU wires to a unix socket
# that the test harness listens on. The console (ttyS0) only carries the kernel log and this script's
# diagnostics.
#
# Wire format: one JSON object per line, both ways; contrib/testguest/README.md is the reference.
#   guest -> host  {"type":"hello","uptime":"3.52"}
#                  {"type":"interfaces","seq":N,"interfaces":[{"name":..,"mac":..,"driver":..,"pci":..,
#                   "operstate":..,"carrier":1|0|null,"ipv4":["10.0.2.15/24"]}, ...]}
#                  {"type":"result","req":N,"rc":RC,"output_b64":"..."}
#   host -> guest  {"req":N,"op":"run","timeout":T,"cmd_b64":"..."}
#                  {"req":N,"op":"dhcp","timeout":T,"ifname":"eth0"}
#
# Design decisions:
# - Two processes share the port: a reporter loop (background) polls sysfs and sends an "interfaces" report
#   whenever the list changes, and the request loop (foreground) serves requests one at a time, in order.
#   Reports therefore keep flowing while a command runs.
# - Every message is written with ONE `echo` (busybox echo issues a single write(2)), and the tty layer
#   serialises whole writes, so the two writers never interleave inside a line. printf would not do: it
#   flushes stdio in chunks.
# - Host -> guest values never need JSON unescaping: numbers, fixed words, an interface name, or base64. The
#   host always writes the keys in the order above, so `field` below can cut values out with parameter
#   expansion. Guest -> host command output goes as base64 for the same reason.
# - The poll loop uses builtins only (under TCG a fork + exec costs ~13 ms) but for an `ip` that lists the IPv4
#   addresses, run when they may have changed and every ~1.5 s otherwise. The request loop wakes the reporter
#   through a FIFO after each request, so a DHCP lease shows in the report at once.

AGENT_TTY=/dev/ttyS1
WAKEUP_FIFO=/run/agent.wakeup
POLL_INTERVAL=0.15
ADDRESS_POLL_ROUNDS=10
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

log() {
    read -r log_uptime _ 2>/dev/null </proc/uptime
    echo "testguest[${log_uptime:-?}]: $*" >/dev/console
}

setup_system() {
    /bin/busybox mkdir -p /proc /sys /dev /run /tmp /usr/bin /usr/sbin /sbin
    /bin/busybox --install -s
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    mount -t tmpfs tmpfs /run
    ip link set lo up
}

load_modules() {
    while read -r module parameters; do
        # $parameters is split on purpose: "IntMode=0 Foo=1" are separate insmod arguments.
        # shellcheck disable=SC2086
        insmod "/lib/modules/$module.ko" $parameters || log "insmod $module failed"
    done </etc/testguest/modules
}

write_udhcpc_script() {
    cat >/run/udhcpc.script <<'EOF'
#!/bin/sh
# udhcpc calls this with the event as $1 and the lease in the environment.
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then
            ip route replace default via "${router%% *}" dev "$interface"
        fi
        ;;
esac
exit 0
EOF
    chmod 0755 /run/udhcpc.script
}

# --- interface reports -------------------------------------------------------------------------------------

# Sets $driver to the name (JSON) of the driver bound to the device behind interface directory $1, or null.
find_driver() {
    driver=null
    if [ -e "$1/device/driver" ] && cd -P "$1/device/driver" 2>/dev/null; then
        driver="\"${PWD##*/}\""
        cd /
    fi
}

# Sets $pci to the PCI address (JSON) of the device behind interface directory $1, or null. For virtio-net the
# device is .../0000:00:02.0/virtio0, so walk up to the PCI function that hosts it.
find_pci_address() {
    pci=null
    cd -P "$1/device" 2>/dev/null || return 0
    while [ "$PWD" != / ]; do
        case "${PWD##*/}" in
            [0-9a-f][0-9a-f][0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f].[0-7])
                pci="\"${PWD##*/}\""
                break
                ;;
        esac
        cd ..
    done
    cd /
}

# Sets $ipv4_json to the JSON array of the IPv4 addresses of interface $1, from $ipv4_lines.
collect_ipv4() {
    ipv4_json=
    while read -r _index name _family address _rest; do
        [ "$name" = "$1" ] || continue
        ipv4_json="$ipv4_json${ipv4_json:+,}\"$address\""
    done <<EOF
$ipv4_lines
EOF
    ipv4_json="[$ipv4_json]"
}

# Sets $interface_json to the report entry of interface $1.
describe_interface() {
    dir=/sys/class/net/$1
    read -r mac <"$dir/address"
    read -r operstate <"$dir/operstate"
    # Reading carrier fails with EINVAL while the interface is down: report null.
    carrier=null
    read -r carrier_value 2>/dev/null <"$dir/carrier" && carrier=$carrier_value
    find_driver "$dir"
    find_pci_address "$dir"
    collect_ipv4 "$1"
    interface_json="{\"name\":\"$1\",\"mac\":\"$mac\",\"driver\":$driver,\"pci\":$pci,"
    interface_json="$interface_json\"operstate\":\"$operstate\",\"carrier\":$carrier,\"ipv4\":$ipv4_json}"
}

# Brings interface $1 up the first time it is seen (by ifindex), so that carrier becomes readable, and asks
# for fresh addresses: a new eth1 must not inherit the addresses of an unplugged one. Later changes made by a
# test (ip link set down) are left alone.
bring_up_if_new() {
    read -r ifindex <"/sys/class/net/$1/ifindex" || return
    case " $seen_ifindexes " in
        *" $ifindex "*) return ;;
    esac
    seen_ifindexes="$seen_ifindexes $ifindex"
    refresh_ipv4=1
    ip link set "$1" up || log "cannot bring $1 up"
}

# Sets $interfaces_json to the JSON list of all interfaces but lo, sorted by name.
describe_interfaces() {
    for dir in /sys/class/net/*; do
        [ "${dir##*/}" = lo ] || bring_up_if_new "${dir##*/}"
    done
    # `ip` is the only exec of a round (about 13 ms under TCG): run it when something may have changed the
    # addresses (a new interface, a finished request), and every ADDRESS_POLL_ROUNDS rounds for the rest.
    rounds=$((rounds + 1))
    if [ "$refresh_ipv4" = 1 ] || [ $((rounds % ADDRESS_POLL_ROUNDS)) = 0 ]; then
        ipv4_lines=$(ip -o -4 addr show 2>/dev/null)
        refresh_ipv4=0
    fi
    interfaces_json=
    for dir in /sys/class/net/*; do
        name=${dir##*/}
        [ "$name" = lo ] && continue
        [ -e "$dir/address" ] || continue
        describe_interface "$name"
        interfaces_json="$interfaces_json${interfaces_json:+,}$interface_json"
    done
}

# Polls every POLL_INTERVAL seconds, and at once when the request loop pokes the wakeup FIFO (fd 4).
report_loop() {
    seq=0
    rounds=0
    refresh_ipv4=1
    last_json="(none)"
    seen_ifindexes=
    while :; do
        describe_interfaces
        if [ "$interfaces_json" != "$last_json" ]; then
            seq=$((seq + 1))
            echo "{\"type\":\"interfaces\",\"seq\":$seq,\"interfaces\":[$interfaces_json]}" >&3
            last_json=$interfaces_json
        fi
        # A builtin sleep (busybox ash reads with fractional timeouts): `sleep` would be an exec per round.
        # shellcheck disable=SC3045
        if read -r -t "$POLL_INTERVAL" _ <&4; then
            refresh_ipv4=1
        fi
    done
}

# --- requests ----------------------------------------------------------------------------------------------

# Sets $value to the value of key $2 in the one-line JSON object $1 (numbers, words and base64 only).
field() {
    case "$1" in
        *"\"$2\":"*) ;;
        *) value= ; return 1 ;;
    esac
    value=${1#*\""$2"\":}
    value=${value%%[,\}]*}
    value=${value#\"}
    value=${value%\"}
}

# Runs "$@" with a deadline of $timeout seconds, stdout and stderr captured together, and sends the result.
# The command gets neither the agent port (fd 3), the wakeup FIFO (fd 4) nor a stdin. The output file is
# per request, so that what a left-over background process writes later cannot leak into another result.
run_and_reply() {
    timeout -s KILL "$timeout" "$@" >"/run/agent.$req.out" 2>&1 </dev/null 3>&- 4>&-
    rc=$?
    reply "$rc" "$(base64 -w 0 "/run/agent.$req.out")"
    rm -f "/run/agent.$req.out"
}

reply() {
    echo "{\"type\":\"result\",\"req\":$req,\"rc\":$1,\"output_b64\":\"$2\"}" >&3
}

handle_request() {
    field "$1" req || { log "ignoring line without req: $1"; return; }
    req=$value
    case "$req" in
        '' | *[!0-9]*) log "ignoring line with a bad req: $1"; return ;;
    esac
    field "$1" timeout || value=30
    timeout=$value
    field "$1" op
    case "$value" in
        run)
            field "$1" cmd_b64
            echo "$value" | base64 -d >"/run/agent.$req.cmd"
            (cd / && run_and_reply sh "/run/agent.$req.cmd")
            rm -f "/run/agent.$req.cmd"
            ;;
        dhcp)
            field "$1" ifname
            run_and_reply udhcpc -i "$value" -n -q -t 5 -T 1 -s /run/udhcpc.script
            ;;
        *)
            reply 127 "$(echo "unknown op: $value" | base64 -w 0)"
            ;;
    esac
}

# Reads the next request line from the agent port into $line, one character at a time. busybox's `read` of a
# whole line starts over when a signal interrupts it, dropping what it had read of the line: this shell is PID 1, so
# every orphan that ends (a test's background command) sends it a SIGCHLD, and a line arrives slowly over the
# serial port. A `read` of one character loses nothing: it is interrupted only while it waits for one.
read_request() {
    line=
    while IFS= read -r -n 1 char <&3; do
        [ -n "$char" ] || return 0  # the newline
        line=$line$char
    done
    return 1
}

request_loop() {
    while :; do
        if read_request; then
            handle_request "$line"
            # Tell the reporter: the request may have changed addresses or links.
            echo >&4
        fi
    done
}

start_agent() {
    exec 3<>"$AGENT_TTY" || { log "no agent port $AGENT_TTY"; return 1; }
    # Opened read-write, so that neither side ever blocks on open or sees end of file.
    mkfifo "$WAKEUP_FIFO"
    exec 4<>"$WAKEUP_FIFO"
    # Raw: no echo of what the host sends, no CR/LF translation either way.
    stty raw -echo <&3
    read -r uptime _idle </proc/uptime
    echo "{\"type\":\"hello\",\"uptime\":\"$uptime\"}" >&3
    report_loop &
    request_loop
}

# `python -m qmpnet.testguest boot` adds testguest.shell to the kernel command line: a shell on the console.
start_console_shell() {
    read -r cmdline </proc/cmdline
    case " $cmdline " in
        *" testguest.shell "*) setsid cttyhack sh </dev/ttyS0 >/dev/ttyS0 2>&1 & ;;
    esac
}

main() {
    setup_system
    log "loading modules"
    load_modules
    write_udhcpc_script
    start_console_shell
    log "agent starting"
    start_agent
    # PID 1 must never exit: a kernel panic would end the guest.
    while :; do sleep 3600; done
}

main
