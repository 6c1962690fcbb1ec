#!/bin/sh
# The ublk "main job" demo: a null target served by ublk-null, exercised by fio.
# Runs inside the xtask VM (cargo xtask demo) or natively on a host that has
# /dev/ublk-control:  UBLK_BIN_DIR=target/debug sh xtask/scripts/demo.sh
set -u
BIN_DIR=${UBLK_BIN_DIR:-/opt/ublk/bin}
NULL=$BIN_DIR/ublk-null
[ -x "$NULL" ] || NULL=$(command -v ublk-null || true)
RUNTIME=${DEMO_RUNTIME:-5}
log() { echo "demo: $*"; }
fail() { echo "demo: FAILED: $*"; [ -n "${pid:-}" ] && kill -TERM "$pid" 2>/dev/null; exit 1; }

[ -n "$NULL" ] && [ -x "$NULL" ] || fail "ublk-null not found (UBLK_BIN_DIR=$BIN_DIR)"
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing (ublk_drv not loaded?)"
command -v fio >/dev/null || fail "fio not found"

out=$(mktemp /tmp/ublk-null.out.XXXXXX)
log "starting $NULL --queues 2 --size 1G"
"$NULL" --queues 2 --size 1G > "$out" 2>&1 &
pid=$!

dev=""
i=0
while [ $i -lt 300 ]; do
    dev=$(grep -o '/dev/ublkb[0-9]*' "$out" 2>/dev/null | head -n 1)
    if [ -z "$dev" ] && [ -b /dev/ublkb0 ]; then dev=/dev/ublkb0; fi
    if [ -n "$dev" ] && [ -b "$dev" ]; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then
        cat "$out"; pid=""; fail "ublk-null exited before the device appeared"
    fi
    sleep 0.1
    i=$((i + 1))
done
[ -n "$dev" ] && [ -b "$dev" ] || { cat "$out"; fail "no block device after 30 s"; }
n=${dev#/dev/ublkb}
log "device $dev is live (ublk-null pid $pid); size $(blockdev --getsize64 "$dev" 2>/dev/null || echo '?') bytes"

for rw in randread randwrite; do
    log "fio $rw on $dev"
    fio --name="$rw" --filename="$dev" --rw="$rw" --bs=4k --iodepth=32 \
        --ioengine=io_uring --direct=1 --time_based --runtime="$RUNTIME" \
        --group_reporting --eta=never || fail "fio $rw failed"
done

log "stopping ublk-null (SIGTERM)"
kill -TERM "$pid" || fail "kill failed"
wait "$pid"
rc=$?
p=$pid; pid=""
echo "--- ublk-null output ---"; cat "$out"; echo "------------------------"
[ "$rc" -eq 0 ] || fail "ublk-null (pid $p) exited with status $rc after SIGTERM"

i=0
while [ $i -lt 50 ] && { [ -e "$dev" ] || [ -e "/sys/class/ublk-char/ublkc$n" ]; }; do
    sleep 0.1; i=$((i + 1))
done
[ -e "$dev" ] && fail "$dev still exists after ublk-null exited"
[ -e "/sys/class/ublk-char/ublkc$n" ] && fail "/sys/class/ublk-char/ublkc$n still exists after ublk-null exited"
rm -f "$out"
log "OK: $dev served fio randread+randwrite and was removed cleanly"
