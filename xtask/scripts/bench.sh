#!/bin/sh
# Guest side of `cargo xtask bench`: fio against the kernel's null_blk, our
# ublk-null and libublk's null target (sync and async styles), interleaved run
# by run. Prints one line per measurement:
#   UBLK_BENCH target=T queues=Q fio_jobs=J job=NAME run=R iops=N cpu=C
# where C is how many CPUs were busy (not idle or waiting on I/O), on average,
# while fio ran: everything counts, fio, the kernel and the server alike (a
# busy-polling server counts as busy). C * 1e6 / N is the CPU time per I/O.
# For a userspace server the line adds srv_user=U srv_sys=S, the CPUs its
# process spent in user mode and in the kernel (system calls, and the task
# work the driver runs in its threads), and for NBD peer=P, the NBD
# server's (qemu-nbd's) user + system; the rest of C is fio's, and the
# kernel's outside those processes.
# Settings come from the environment: BENCH_RUNS, BENCH_RUNTIME, BENCH_TARGETS,
# BENCH_JOBS (substrings of job names), BENCH_CONFIGS ("QxJ ...").
# ublk-null+copy runs ublk-null --data-copy; ublk-null+async its async null
# target; ublk-null+affinity, +away, +unpinned and +auto choose its --placement;
# ublk-null+pollN its --busy-poll-us. On any ublk target, +batch insists on
# batched commands (--batch, 7.0+) and +nobatch turns them off (--no-batch);
# without either, the CLI's default (batched where the kernel has them).
# ublk-loop+copy, +user-copy, +zero-copy and +auto-buf-reg
# run `ublk add -t loop` with that --data-path over a 512 MiB file on tmpfs
# (filled once, so reads find pages, not holes); kloop is the kernel's loop
# driver (losetup, buffered, as it comes) over the same file.
# A +pollN suffix on either sets --busy-poll-us N (e.g. ublk-loop+zero-copy+poll0).
# ublk-ramdisk+DP is `ublk add -t ramdisk --size 512M --data-path DP`, brd the
# kernel's ramdisk of the same size (brd.ko rd_size, loaded here). Both are
# written once before they are measured, so reads find data. A +twin suffix changes
# nothing: a second column of the same target shows the run-to-run noise.
# NBD (`--targets nbd` is ublk-nbd and nbd.ko): qemu-nbd exports a 256 MiB
# file on tmpfs (filled once) over loopback TCP, started afresh for each
# target; ublk-nbd is `ublk add -t nbd` (one connection per queue),
# ublk-nbd+simple the same with --simple-replies, ublk-nbd+pollN with
# --busy-poll-us N, ublk-nbd+affinity|+away|+unpinned|+auto with that --placement,
# ublk-nbd+zero-copy|+auto-buf-reg|+copy on that data path
# (zero copy: long READ payloads read from the socket into the request's
# pages, and with user copy beside it where the kernel has it, which
# ublk add asks for, short ones through the daemon), ublk-nbd+bin:NAME with
# the CLI binary NAME (another build, put in the guest by
# UBLK_VM_EXTRA_BINS=/path/NAME), and nbd.ko the kernel's
# nbd client configured by nbd-client with the same number of connections.
# Q of a QxJ configuration is the number of connections.
RUNS=${BENCH_RUNS:-5}
RUNTIME=${BENCH_RUNTIME:-3}
TARGETS=${BENCH_TARGETS:-"null_blk ublk-null ublk-null+twin ublk-null+async libublk-sync libublk-async ublk-loop+copy ublk-loop+user-copy"}
# "nbd": ours and the kernel's client.
TARGETS=$(echo " $TARGETS " | sed 's/ nbd / ublk-nbd nbd.ko /; s/^ //; s/ $//')
NBD_KO=$(find /lib/modules -name 'nbd.ko' 2>/dev/null | head -1)
NBD_IMG=/tmp/bench-nbd.img
CONFIGS=${BENCH_CONFIGS:-"1x1 2x1 2x2"}
NULLBLK=$(find /lib/modules -name 'null_blk.ko' 2>/dev/null | head -1)
BRD_KO=$(find /lib/modules -name 'brd.ko' 2>/dev/null | head -1)

all_jobs() {
    echo "randread-4k-qd1 --rw=randread --bs=4k --iodepth=1"
    echo "randread-4k-qd64 --rw=randread --bs=4k --iodepth=64"
    echo "randwrite-4k-qd64 --rw=randwrite --bs=4k --iodepth=64"
    echo "read-128k-qd16 --rw=read --bs=128k --iodepth=16"
    echo "write-128k-qd16 --rw=write --bs=128k --iodepth=16"
}

jobs() {
    all_jobs | while read -r name args; do
        if [ -z "$BENCH_JOBS" ]; then echo "$name $args"; continue; fi
        for j in $BENCH_JOBS; do
            case $name in *"$j"*) echo "$name $args"; break ;; esac
        done
    done
}

# busy and total jiffies of all CPUs so far (first line of /proc/stat:
# user nice system idle iowait irq softirq steal ...)
cpu_jiffies() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9; exit}' /proc/stat; }

# User and system jiffies of process $1, all its threads ("0 0" without
# one). The name in parentheses may hold spaces: fields count after it.
proc_jiffies() {
    if [ -n "$1" ] && [ -r "/proc/$1/stat" ]; then sed 's/.*) //' "/proc/$1/stat" | awk '{print $12, $13}'; else echo "0 0"; fi
}

wait_dev() { i=0; while [ ! -b "$1" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done; [ -b "$1" ]; }

# A target name's data path (its first +suffix that is not +pollN) and its
# busy-poll microseconds (+pollN), for loop and ramdisk.
dp_of() { echo "$1" | tr '+' '\n' | sed -n '2,$p' | grep -v -e '^poll[0-9]*$' -e '^batch$' -e '^nobatch$' -e '^twin$' | head -1; }
# +batch insists on batched commands, +nobatch turns them off; without
# either, the CLI's default (batched where the kernel has them).
batch_of() { case $1 in *+nobatch*) echo --no-batch ;; *+batch*) echo --batch ;; esac; }
poll_of() { echo "$1" | sed -n 's/.*+poll\([0-9]*\).*/\1/p'; }
# +affinity, +away, +unpinned, +auto: that --placement (default: the CLI's)
placement_of() { case $1 in *+auto+*|*+auto) echo "--placement auto" ;; *+affinity*) echo "--placement affinity" ;; *+unpinned*) echo "--placement unpinned" ;; *+away*) echo "--placement away" ;; esac; }

start_target() { # target queues -> sets DEV, PID
    t=$1; q=$2; PID=; FILL=
    case $t in
    null_blk)
        if [ -n "$NULLBLK" ]; then
            rmmod null_blk 2>/dev/null
            insmod "$NULLBLK" queue_mode=2 irqmode=0 submit_queues="$q" hw_queue_depth=64 gb=4 nr_devices=1 || return 1
            DEV=/dev/nullb0
        elif [ -d /sys/module/null_blk ]; then
            # Built in (our 6.1): make a device with the same settings through configfs.
            grep -q " /sys/kernel/config " /proc/mounts || mount -t configfs none /sys/kernel/config || return 1
            c=/sys/kernel/config/nullb/bench
            mkdir "$c" || return 1
            echo 2 > $c/queue_mode; echo 0 > $c/irqmode; echo "$q" > $c/submit_queues
            echo 64 > $c/hw_queue_depth; echo 4096 > $c/size; echo 1 > $c/power || return 1
            # 6.1 names the disk after the configfs directory; others nullbN.
            if [ -e /sys/block/bench ]; then DEV=/dev/bench; else DEV=/dev/nullb$(cat $c/index); fi
            NULLB_CFS=$c
        else
            echo "bench: no null_blk"; return 1
        fi ;;
    ublk-null*)
        extra=
        case $t in *+copy*) extra="$extra --data-copy" ;; esac
        case $t in *+async*) extra="$extra --async" ;; esac
        extra="$extra $(batch_of "$t")"
        extra="$extra $(placement_of "$t")"
        poll=$(poll_of "$t")
        [ -n "$poll" ] && extra="$extra --busy-poll-us $poll"
        ublk-null --queues "$q" --depth 128 --size 4G $extra > /tmp/bench-out 2>/tmp/bench-err & PID=$!
        DEV=/dev/ublkb0 ;;
    ublk-loop+*)
        if [ ! -f /tmp/bench-loop.img ]; then
            dd if=/dev/zero of=/tmp/bench-loop.img bs=1M count=512 status=none || return 1
        fi
        dp=$(dp_of "$t"); poll=$(poll_of "$t")
        ublk add -t loop --file /tmp/bench-loop.img --queues "$q" --depth 128 ${dp:+--data-path $dp} ${poll:+--busy-poll-us $poll} $(batch_of "$t") > /tmp/bench-out 2>/tmp/bench-err & PID=$!
        DEV=/dev/ublkb0 ;;
    ublk-ramdisk*)
        dp=$(dp_of "$t"); poll=$(poll_of "$t")
        ublk add -t ramdisk --size 512M --queues "$q" --depth 128 ${dp:+--data-path $dp} ${poll:+--busy-poll-us $poll} $(batch_of "$t") > /tmp/bench-out 2>/tmp/bench-err & PID=$!
        DEV=/dev/ublkb0
        FILL=1 ;;
    brd)
        if [ -n "$BRD_KO" ]; then
            rmmod brd 2>/dev/null
            insmod "$BRD_KO" rd_nr=1 rd_size=524288 max_part=0 || return 1
        elif [ ! -b /dev/ram0 ]; then
            echo "bench: this kernel has no brd"; return 1
        elif [ "$(cat /sys/block/ram0/size)" -lt 1048576 ]; then
            echo "bench: brd is built in with $(($(cat /sys/block/ram0/size) / 2048)) MiB disks, not 512 MiB"; return 1
        fi
        BRD=1; DEV=/dev/ram0; FILL=1 ;;
    kloop)
        if [ ! -f /tmp/bench-loop.img ]; then
            dd if=/dev/zero of=/tmp/bench-loop.img bs=1M count=512 status=none || return 1
        fi
        # (BusyBox's losetup: no --show.)
        DEV=$(losetup -f) || return 1
        losetup "$DEV" /tmp/bench-loop.img || return 1
        KLOOP=$DEV ;;
    libublk-sync)
        libublk-null sync "$q" 128 > /tmp/bench-out 2>/tmp/bench-err & PID=$!
        DEV=/dev/ublkb0 ;;
    libublk-async)
        libublk-null async "$q" 128 > /tmp/bench-out 2>/tmp/bench-err & PID=$!
        DEV=/dev/ublkb0 ;;
    ublk-nbd* | nbd.ko)
        start_nbd "$t" "$q" || return 1 ;;
    *)
        echo "bench: unknown target $t"; return 1 ;;
    esac
    wait_dev "$DEV" || { echo "bench: $t did not create $DEV"; cat /tmp/bench-err; return 1; }
    if [ -n "$FILL" ]; then
        # A ramdisk reads zeroes without copying where nothing was written.
        dd if=/dev/zero of="$DEV" bs=1M count=512 oflag=direct status=none || return 1
        FILL=
    fi
    sleep 0.5
}

# qemu-nbd on 127.0.0.1:10809 exporting $NBD_IMG as "disk" (up to 4
# clients: it then advertises CAN_MULTI_CONN) -> NBD_SRV
nbd_server_start() {
    ip link set lo up
    if [ ! -f $NBD_IMG ]; then
        dd if=/dev/zero of=$NBD_IMG bs=1M count=256 status=none || return 1
    fi
    qemu-nbd -f raw -x disk -t -e 4 --cache=writeback -b 127.0.0.1 -p 10809 $NBD_IMG > /tmp/bench-nbd-srv 2>&1 & NBD_SRV=$!
    # listening once /proc/net/tcp has 127.0.0.1:10809 (0x2A39) in state 0A
    i=0; while ! grep -q ':2A39 00000000:0000 0A' /proc/net/tcp && [ $i -lt 400 ]; do sleep 0.05; i=$((i + 1)); done
    grep -q ':2A39 00000000:0000 0A' /proc/net/tcp || { echo "bench: qemu-nbd does not listen"; cat /tmp/bench-nbd-srv; return 1; }
}

start_nbd() { # target connections -> DEV, PID
    nbd_server_start || return 1
    case $1 in
    ublk-nbd*)
        extra=
        case $1 in *+simple*) extra="$extra --simple-replies" ;; esac
        case $1 in *+zero-copy*) extra="$extra --data-path zero-copy" ;; *+auto-buf-reg*) extra="$extra --data-path auto-buf-reg" ;; *+copy*) extra="$extra --data-path copy" ;; esac
        poll=$(poll_of "$1")
        [ -n "$poll" ] && extra="$extra --busy-poll-us $poll"
        extra="$extra $(batch_of "$1") $(placement_of "$1")"
        # +bin:NAME: another build of the CLI (UBLK_VM_EXTRA_BINS), e.g.
        # an older commit's, measured in the same boot.
        bin=ublk
        case $1 in *+bin:*) bin=$(echo "$1" | sed 's/.*+bin:\([^+]*\).*/\1/') ;; esac
        $bin add -t nbd --host 127.0.0.1 --port 10809 --export disk --queues "$2" --depth 128 $extra > /tmp/bench-out 2>/tmp/bench-err & PID=$!
        DEV=/dev/ublkb0 ;;
    nbd.ko)
        [ -n "$NBD_KO" ] || { echo "bench: this kernel has no nbd.ko"; return 1; }
        command -v nbd-client > /dev/null || { echo "bench: no nbd-client in the VM (apt-get install nbd-client on the host)"; return 1; }
        [ -d /sys/module/nbd ] || insmod "$NBD_KO" nbds_max=1 || return 1
        nbd-client 127.0.0.1 10809 /dev/nbd0 -N disk -C "$2" -b 512 > /tmp/bench-err 2>&1 || { cat /tmp/bench-err; return 1; }
        NBD_DEV=/dev/nbd0
        i=0; while [ "$(cat /sys/block/nbd0/size 2>/dev/null)" = 0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
        DEV=/dev/nbd0 ;;
    esac
}

stop_target() {
    if [ -n "$KLOOP" ]; then
        losetup -d "$KLOOP"; KLOOP=
    fi
    if [ -n "$BRD" ]; then
        [ -n "$BRD_KO" ] && rmmod brd 2>/dev/null; BRD=
    fi
    if [ -n "$NBD_DEV" ]; then
        nbd-client -d "$NBD_DEV" > /dev/null 2>&1; NBD_DEV=
    fi
    if [ -n "$NULLB_CFS" ]; then
        echo 0 > "$NULLB_CFS/power"; rmdir "$NULLB_CFS"; NULLB_CFS=
    fi
    if [ -n "$PID" ]; then
        kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null
        i=0; while [ -e /dev/ublkb0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
    fi
    if [ -n "$NBD_SRV" ]; then
        kill "$NBD_SRV" 2>/dev/null; wait "$NBD_SRV" 2>/dev/null; NBD_SRV=
    fi
}

# fio running job $1 (its name) with arguments $2 on $DEV, $fj jobs: the
# same in the measured runs and the profiled ones.
fio_cmd() {
    echo "fio --name=$1 --filename=$DEV $2 --ioengine=io_uring --direct=1 --time_based --runtime=$RUNTIME --numjobs=$fj --group_reporting"
}

# Our server's per-queue counts (moves: Placement::Auto's home/away moves),
# each line prefixed with $1.
server_stats() { grep "^queue\|^nbd" /tmp/bench-out | sed "s/^/$1 /"; }

# The targets in the order of run $1: the list turned left by run - 1, so
# that over as many runs as targets each is measured in every place. The
# place matters: one build under two names, first and third in each of 3
# runs, gave the later one 1.29-1.57x the first's IOPS at 128k loop reads.
order() {
    k=$(( ($1 - 1) % $(echo $TARGETS | wc -w) )); i=0; head=; tail=
    for t in $TARGETS; do
        if [ $i -lt $k ]; then tail="$tail $t"; else head="$head $t"; fi
        i=$((i + 1))
    done
    echo $head $tail
}

# The string-copy flags decide how the kernel copies to and from user
# memory (rep movsb with erms or fsrm), which matters under --icount.
COPY_FLAGS=
for f in $(grep -m1 '^flags' /proc/cpuinfo); do
    case $f in erms | fsrm) COPY_FLAGS="$COPY_FLAGS${COPY_FLAGS:+,}$f" ;; esac
done
echo "UBLK_BENCH_META fio=$(fio --version) kernel=$(uname -r) cpus=$(nproc) runs=$RUNS runtime=$RUNTIME copy_flags=${COPY_FLAGS:-none}"
for run in $(seq 1 "$RUNS"); do
    for cfg in $CONFIGS; do
        q=${cfg%x*}; fj=${cfg#*x}
        for t in $(order "$run"); do
            start_target "$t" "$q" || { stop_target; continue; }
            jobs | while read -r name args; do
                cmd="$(fio_cmd "$name" "$args") --output-format=terse --terse-version=3"
                j0=$(cpu_jiffies); s0=$(proc_jiffies "$PID"); p0=$(proc_jiffies "$NBD_SRV")
                out=$($cmd 2>/dev/null)
                j1=$(cpu_jiffies); s1=$(proc_jiffies "$PID"); p1=$(proc_jiffies "$NBD_SRV")
                cpu=$(echo "$j0 $j1" | awk -v n="$(nproc)" '{ t = $4 - $2; printf "%.2f", (t > 0 ? ($3 - $1) / t * n : 0) }')
                # The server's share (user, system) and the NBD server's
                # (user + system), in CPUs like `cpu`.
                split=$(echo "$j0 $j1 $s0 $s1 $p0 $p1" | awk -v n="$(nproc)" -v srv="$PID" -v peer="$NBD_SRV" '{
                    t = $4 - $2; if (t <= 0) exit
                    # (A process gone by the end reads as 0 0: no figure.)
                    if (srv != "" && $7 + $8 >= $5 + $6) printf " srv_user=%.3f srv_sys=%.3f", ($7 - $5) / t * n, ($8 - $6) / t * n
                    if (peer != "" && $11 + $12 >= $9 + $10) printf " peer=%.3f", ($11 + $12 - $9 - $10) / t * n }')
                # terse v3: field 8 read IOPS, field 49 write IOPS
                r=$(echo "$out" | awk -F';' '{print $8 + $49}')
                echo "UBLK_BENCH target=$t queues=$q fio_jobs=$fj job=$name run=$run iops=${r:-0} cpu=$cpu$split"
                [ "$run" = 1 ] && [ "$t" = "${TARGETS%% *}" ] && echo "UBLK_BENCH_CMD job=$name fio_jobs=$fj cmd=$cmd"
            done
            stop_target
            case $t in ublk-*) server_stats "UBLK_BENCH_STATS target=$t queues=$q fio_jobs=$fj run=$run" ;; esac
        done
    done
done
# BENCH_PERF=1, with perf in the guest (UBLK_VM_TOOLS=perf on the host):
# after the measured runs, each target and job once more under `perf record
# -a` (cpu-clock samples of every CPU), then the top of `perf report` by
# command and symbol, each line prefixed UBLK_BENCH_PERF. Where the time
# goes, not how much: perf's own cost is in these runs, not in the others.
# BENCH_PERF_HZ (samples per second and CPU, 2000), BENCH_PERF_SORT (the
# report's --sort keys, comm,sym), BENCH_PERF_MIN (the
# report's cut-off in percent, 0.5) and BENCH_PERF_LINES (70) tune it.
if [ -n "$BENCH_PERF" ]; then
    command -v perf > /dev/null || { echo "bench: BENCH_PERF without perf in the guest (UBLK_VM_TOOLS=perf)"; exit 1; }
    for cfg in $CONFIGS; do
        q=${cfg%x*}; fj=${cfg#*x}
        for t in $TARGETS; do
            start_target "$t" "$q" || { stop_target; continue; }
            jobs | while read -r name args; do
                perf record -a -F ${BENCH_PERF_HZ:-2000} -o /tmp/perf.data -- $(fio_cmd "$name" "$args") > /dev/null 2>&1
                perf report -i /tmp/perf.data --stdio --no-children --sort ${BENCH_PERF_SORT:-comm,sym} --percent-limit ${BENCH_PERF_MIN:-0.5} 2>/dev/null |
                    grep -v '^#' | grep -v '^ *$' | head -${BENCH_PERF_LINES:-70} | sed "s/^/UBLK_BENCH_PERF target=$t queues=$q fio_jobs=$fj job=$name /"
            done
            stop_target
            case $t in ublk-*) server_stats "UBLK_BENCH_PERF_STATS target=$t" ;; esac
        done
    done
fi
[ -n "$NULLBLK" ] && rmmod null_blk 2>/dev/null
exit 0
