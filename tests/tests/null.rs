//! ublk-null against the real driver: sizes, I/O with dd and fio, every queue
//! serving, clean teardown on SIGTERM, SIGKILL mid-I/O, and 50 create/destroy
//! cycles without leaks, and the data path without copies (USER_COPY).

use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use ublk::{DataPath, DeviceBuilder, NullTarget, RamDisk};
use ublk_tests::*;

fn fio(dev: &str, rw: &str, engine: &str, jobs: usize, extra: &[&str]) -> String {
    let jobs_s = jobs.to_string();
    let cpus = format!("0-{}", nproc() - 1);
    let mut args = vec![
        "--name=t",
        "--filename",
        dev,
        "--rw",
        rw,
        "--bs=4k",
        "--ioengine",
        engine,
        "--iodepth=16",
        "--direct=1",
        "--time_based",
        "--runtime=300ms",
        "--numjobs",
        &jobs_s,
        "--cpus_allowed",
        &cpus,
        "--cpus_allowed_policy=split",
        "--group_reporting",
    ];
    args.extend_from_slice(extra);
    let out = run_ok("fio", &args);
    for l in out.lines().filter(|l| l.contains("err=")) {
        assert!(l.contains("err= 0"), "fio {rw} {engine} reported an error: {l}\n{out}");
    }
    out
}

driver_test! {
    /// 1, 2 and 4 queues: size and block size as asked, dd and fio (io_uring
    /// and libaio, reads and writes) succeed, and every queue served I/O.
    fn null_queues_sizes_io_and_every_queue_serves() {
        for (queues, bs, size) in [(1u16, 512u32, "256M"), (2, 4096, "1G"), (4, 4096, "64M")] {
            let d = Daemon::start("ublk-null", &["--queues", &queues.to_string(), "--block-size", &bs.to_string(), "--size", size]);
            let dev = d.dev.to_str().unwrap().to_string();
            let bytes = ublk_cli::parse_size(size).unwrap();
            assert_eq!(run_ok("blockdev", &["--getsize64", &dev]).trim(), bytes.to_string());
            assert_eq!(run_ok("blockdev", &["--getss", &dev]).trim(), bs.to_string());
            run_ok("dd", &[&format!("if={dev}"), "of=/dev/null", "bs=64k", "count=64", "iflag=direct"]);
            run_ok("dd", &["if=/dev/zero", &format!("of={dev}"), "bs=64k", "count=64", "oflag=direct"]);
            // The kernel gives a device at most one queue per CPU.
            let expect_q = usize::from(queues).min(nproc());
            for engine in ["io_uring", "libaio"] {
                fio(&dev, "randread", engine, expect_q, &[]);
                fio(&dev, "randwrite", engine, expect_q, &[]);
            }
            let (st, out) = d.terminate();
            assert!(st.success(), "ublk-null exited with {st}");
            let per_q = queue_requests(&out);
            assert_eq!(per_q.len(), expect_q, "per-queue report: {out}");
            for (q, n) in &per_q {
                assert!(*n > 0, "queue {q} served no request ({queues} queues asked): {out}");
            }
            eprintln!("{queues} queues asked, {expect_q} made: {per_q:?}");
            assert_no_devices();
        }
    }
}

driver_test! {
    /// SIGTERM (and SIGINT) stop and delete the device, exit code 0.
    fn null_sigterm_and_sigint_remove_the_device() {
        for sig in [libc::SIGTERM, libc::SIGINT] {
            let mut d = Daemon::start("ublk-null", &["--size", "16M"]);
            let id: u32 = d.dev.to_str().unwrap().trim_start_matches("/dev/ublkb").parse().unwrap();
            assert!(ublk_devices().contains(&id));
            d.signal(sig);
            let st = wait_timeout(&mut d.child, Duration::from_secs(60)).expect("exit after signal");
            assert!(st.success(), "exit status {st} after signal {sig}");
            assert_no_devices();
        }
    }
}

driver_test! {
    /// 50 create/serve/destroy cycles through the library leave no fd,
    /// thread, mapping or device behind.
    fn null_fifty_cycles_leak_nothing() {
        // One cycle first, so lazily created process state is not counted.
        let cycle = |i: usize| {
            let dev = DeviceBuilder::new().queues(2).depth(32).size(64 << 20).create().expect("create");
            let id = dev.id();
            let stats = dev
                .serve(&NullTarget, |dev, stop| {
                    // Live: the kernel has added the disk, with the size asked.
                    let sectors = std::fs::read_to_string(format!("/sys/block/ublkb{}/size", dev.id()))
                        .unwrap_or_else(|e| panic!("cycle {i}: device {} live but not in /sys/block: {e}", dev.id()));
                    assert_eq!(sectors.trim(), ((64u64 << 20) >> 9).to_string(), "cycle {i}: size of device {}", dev.id());
                    // The node itself (devtmpfs) must appear within wait_for_path's 10 s.
                    wait_for_path(&dev.block_path());
                    if i % 10 == 0 {
                        // Some real I/O now and then.
                        let mut f = std::fs::File::open(dev.block_path()).unwrap();
                        let mut buf = vec![0u8; 4096];
                        std::io::Read::read_exact(&mut f, &mut buf).unwrap();
                    }
                    stop.stop();
                })
                .expect("serve");
            assert_eq!(stats.len(), 2.min(nproc()));
            assert!(!ublk_devices().contains(&id), "device {id} left after cycle {i}");
        };
        cycle(0);
        let before = resources();
        let t0 = Instant::now();
        for i in 1..=50 {
            cycle(i);
        }
        let after = resources();
        eprintln!("50 cycles in {:?}; before {before:?} after {after:?}", t0.elapsed());
        assert_eq!(before, after, "resources leaked over 50 cycles");
        assert_no_devices();
    }
}

driver_test! {
    /// SIGKILL of the daemon while fio runs: fio fails instead of hanging,
    /// and the device can then be deleted; the kernel reports no hung task.
    fn null_sigkill_during_fio_fails_io_and_device_can_be_deleted() {
        let mut d = Daemon::start("ublk-null", &["--size", "256M", "--queues", "2"]);
        let dev = d.dev.to_str().unwrap().to_string();
        let mut fio = std::process::Command::new("fio")
            .args(["--name=k", "--filename", &dev, "--rw=randread", "--bs=4k", "--ioengine=io_uring", "--iodepth=16", "--direct=1", "--time_based", "--runtime=60"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        d.signal(libc::SIGKILL);
        let _ = d.child.wait();
        // 6.1 notices a dead daemon within its 5 s monitor period; later
        // kernels when the io_uring goes away.
        let st = wait_timeout(&mut fio, Duration::from_secs(45));
        let st = st.unwrap_or_else(|| {
            let _ = fio.kill();
            panic!("fio hung after the daemon was killed")
        });
        eprintln!("fio after SIGKILL: {st}");
        assert!(!st.success(), "fio should see I/O errors after the daemon died");
        delete_all_devices();
        assert_no_devices();
        let (_, log, _) = run("dmesg", &[]);
        assert!(!log.contains("blocked for more than"), "hung task in the kernel log:\n{log}");
    }
}

/// Panics while serving its first read.
struct PanicTarget;

impl ublk::Target for PanicTarget {
    fn handle(&self, req: &ublk::Request, _buf: &mut [u8]) -> ublk::IoResult {
        if req.op == ublk::Op::Read {
            panic!("target panic (deliberate, in a test)");
        }
        Ok(req.len() as u32)
    }
}

driver_test! {
    /// A panic in a queue thread, or in the caller's on_live callback, ends
    /// with the device stopped and deleted, and no hang.
    fn null_panics_tear_the_device_down() {
        // Queue thread panic: serve returns the error.
        let dev = DeviceBuilder::new().size(16 << 20).create().unwrap();
        let r = dev.serve(&PanicTarget, |dev, _stop| {
            let path = dev.block_path();
            // The read fails once the queue is gone (or hangs until teardown aborts it).
            std::thread::spawn(move || {
                let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).unwrap();
                let mut b = vec![0u8; 8192];
                let _ = std::io::Read::read(&mut f, aligned(&mut b, 4096));
            });
        });
        let e = r.expect_err("a queue thread panicked");
        eprintln!("serve after a queue panic: {e}");
        assert!(e.to_string().contains("panicked"), "{e}");
        assert_no_devices();

        // Panic in on_live: re-raised after teardown.
        let dev = DeviceBuilder::new().size(16 << 20).create().unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            dev.serve(&NullTarget, |_dev, _stop| panic!("on_live panic (deliberate, in a test)"))
        }));
        assert!(r.is_err(), "the panic is re-raised");
        assert_no_devices();
    }
}

driver_test! {
    /// DataPath::NoData gets UBLK_F_USER_COPY where the kernel offers it
    /// (6.5+: on 6.12 and the newest, not on 6.1). The kernel then copies
    /// nothing: a read leaves the reader's buffer as it was, where
    /// DataPath::Copy overwrites it with the tag's (zeroed) buffer. A target
    /// that needs data is refused on such a device, naming the fix, and
    /// nothing is left behind; without USER_COPY it falls back and serves.
    fn null_data_path_skips_the_copy_where_the_kernel_allows() {
        let uc_flag = ublk::sys::abi::UBLK_F_USER_COPY;
        let has_uc = kernel_has(ublk::sys::abi::UBLK_F_USER_COPY);
        assert_eq!(has_uc, kernel_version() >= (6, 5), "USER_COPY offered on {}", kernel_release());
        const LEN: usize = 64 << 10;
        for path in [DataPath::Copy, DataPath::NoData] {
            let dev = DeviceBuilder::new().size(16 << 20).data_path(path).create().unwrap();
            let got_uc = dev.info().flags & uc_flag != 0;
            assert_eq!(got_uc, path == DataPath::NoData && has_uc, "{path:?}: flags {:#x}", dev.info().flags);
            let stats = dev
                .serve(&NullTarget, |dev, stop| {
                    let mut f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_DIRECT)
                        .open(dev.block_path())
                        .unwrap();
                    let mut backing = vec![0xABu8; LEN + 4096];
                    let buf = aligned(&mut backing, LEN);
                    std::io::Read::read_exact(&mut f, buf).unwrap();
                    let untouched = buf.iter().all(|&b| b == 0xAB);
                    let zeroed = buf.iter().all(|&b| b == 0);
                    eprintln!("{path:?} (USER_COPY {got_uc}): read left the buffer untouched {untouched}, zeroed {zeroed}");
                    if got_uc {
                        assert!(untouched, "USER_COPY: the kernel copied into the reader's buffer");
                    } else {
                        assert!(zeroed, "copy: the read did not return the tag buffer's zeros");
                    }
                    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(1 << 20)).unwrap();
                    std::io::Write::write_all(&mut f, buf).unwrap();
                    stop.stop();
                })
                .unwrap();
            let s = stats[0];
            assert!(s.reads >= 1 && s.writes >= 1, "{path:?}: {s:?}");
            assert!(s.bytes >= 2 * LEN as u64, "{path:?}: {s:?}");
            assert_no_devices();
        }
        let dev = DeviceBuilder::new().size(16 << 20).data_path(DataPath::NoData).create().unwrap();
        let ram = RamDisk::new(16 << 20).unwrap();
        let r = dev.serve(&ram, |_dev, stop| stop.stop());
        if has_uc {
            let e = r.expect_err("a data target on a USER_COPY device");
            eprintln!("ramdisk on a NoData device: {e}");
            assert!(e.to_string().contains("DataPath::Copy"), "{e}");
        } else {
            r.expect("without USER_COPY, NoData falls back to copying and a data target works");
        }
        assert_no_devices();
        // Served async the same (it copies by itself under user copy, but
        // a NoData device says it serves no data).
        let dev = DeviceBuilder::new().size(16 << 20).data_path(DataPath::NoData).create().unwrap();
        let r = dev.serve_async(&ram, |_dev, stop| stop.stop());
        if has_uc {
            let e = r.expect_err("an async data target on a USER_COPY device");
            assert!(e.to_string().contains("DataPath::Copy"), "{e}");
        } else {
            r.expect("without USER_COPY, NoData falls back to copying and a data target works");
        }
        assert_no_devices();
    }
}

driver_test! {
    /// Busy polling (on by default): a stream of one-at-a-time reads is
    /// picked up by polling the ring's IORING_SQ_TASKRUN flag, not by waking
    /// a sleeping queue thread. With polling off every batch waits in
    /// io_uring_enter. Both serve the same I/O. The polling window here is
    /// 20 ms, far above a read's round trip even under TCG, so a vCPU the
    /// host takes away for a few ms does not decide the outcome.
    fn null_busy_poll_picks_up_requests_without_waking() {
        const READS: u64 = 2000;
        for poll in [std::time::Duration::from_millis(20), std::time::Duration::ZERO] {
            let dev = DeviceBuilder::new().size(16 << 20).busy_poll(poll).data_path(DataPath::NoData).create().unwrap();
            let stats = dev
                .serve(&NullTarget, |dev, stop| {
                    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(dev.block_path()).unwrap();
                    let mut backing = vec![0u8; 8192];
                    let buf = aligned(&mut backing, 4096);
                    for i in 0..READS {
                        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start((i % 4096) * 4096)).unwrap();
                        std::io::Read::read_exact(&mut f, buf).unwrap();
                    }
                    stop.stop();
                })
                .unwrap();
            let s = stats[0];
            eprintln!("busy poll {poll:?}: reads {} enters {} waits {} polled {}", s.reads, s.enters, s.waits, s.polled);
            assert!(s.reads >= READS, "{s:?}");
            if poll.is_zero() {
                assert_eq!(s.polled, 0, "{s:?}");
                assert!(s.waits >= READS, "{s:?}");
            } else {
                assert!(s.polled >= READS / 2, "most one-at-a-time reads should be found by polling: {s:?}");
            }
            assert_no_devices();
        }
    }
}

driver_test! {
    /// The I/O scheduler: ublk-null sets `none` (6.1 would give a one-queue
    /// device mq-deadline); the library leaves the kernel's choice by default;
    /// an unknown scheduler fails serve() with what the kernel offers, and
    /// the device is gone.
    fn null_io_scheduler_is_set_or_refused_cleanly() {
        let d = Daemon::start("ublk-null", &["--size", "16M"]);
        let id = d.dev.to_str().unwrap().trim_start_matches("/dev/ublkb").to_string();
        let sched = std::fs::read_to_string(format!("/sys/block/ublkb{id}/queue/scheduler")).unwrap();
        eprintln!("ublk-null: {}", sched.trim());
        assert!(sched.contains("[none]"), "{sched}");
        let (st, _) = d.terminate();
        assert!(st.success());

        let dev = DeviceBuilder::new().size(16 << 20).create().unwrap();
        dev.serve(&NullTarget, |dev, stop| {
            let p = format!("/sys/block/ublkb{}/queue/scheduler", dev.id());
            eprintln!("kernel default for one queue on {}: {}", kernel_release(), std::fs::read_to_string(p).unwrap().trim());
            stop.stop();
        })
        .unwrap();

        let dev = DeviceBuilder::new().size(16 << 20).io_scheduler(Some("no-such-sched")).create().unwrap();
        let e = dev.serve(&NullTarget, |_dev, _stop| panic!("on_live must not run")).expect_err("unknown scheduler");
        eprintln!("unknown scheduler: {e}");
        assert!(e.to_string().contains("no-such-sched") && e.to_string().contains("offers"), "{e}");
        assert_no_devices();
    }
}

driver_test! {
    /// The request timeout (`DeviceBuilder::io_timeout`, `ublk add
    /// --io-timeout-ms`): set in `queue/io_timeout` once the device is live,
    /// and I/O goes on; left to the kernel when unset; out of range or on an
    /// unprivileged device refused before any device exists.
    fn null_io_timeout_is_set_or_refused_cleanly() {
        // Unset, the kernel's: blk-mq's 30 s, where the driver has a timeout
        // handler (the attribute exists only then: not on 6.1, which has
        // none; from 6.7 `ublk_timeout` is how a queue whose every tag the
        // dead server held gets aborted).
        let v = kernel_version();
        let has = std::sync::atomic::AtomicBool::new(false);
        let dev = DeviceBuilder::new().size(16 << 20).create().unwrap();
        dev.serve(&NullTarget, |dev, stop| {
            let p = format!("/sys/block/ublkb{}/queue/io_timeout", dev.id());
            if let Ok(ms) = std::fs::read_to_string(p) {
                has.store(true, std::sync::atomic::Ordering::SeqCst);
                eprintln!("kernel default on {}: {} ms", kernel_release(), ms.trim());
                assert_eq!(ms.trim(), "30000", "io_timeout unset");
            }
            stop.stop();
        })
        .unwrap();
        let has = has.load(std::sync::atomic::Ordering::SeqCst);
        assert!(has || v < (6, 7), "no queue/io_timeout on {}", kernel_release());
        assert!(!has || v >= (6, 2), "queue/io_timeout on {}, whose driver has no timeout handler", kernel_release());

        if has {
            let d = Daemon::start("ublk", &["add", "-t", "null", "--size", "16M", "--io-timeout-ms", "1500"]);
            let attr = format!("/sys/block/ublkb{}/queue/io_timeout", d.id());
            assert_eq!(std::fs::read_to_string(&attr).unwrap().trim(), "1500", "{attr}");
            run_ok("dd", &["if=/dev/zero", &format!("of={}", d.dev.display()), "bs=4k", "count=16", "oflag=direct"]);
            let (st, _) = d.terminate();
            assert!(st.success(), "ublk add --io-timeout-ms 1500 exited with {st}");
        } else {
            let (st, out, err) = ublk(&["add", "-t", "null", "--size", "16M", "--io-timeout-ms", "1500"]);
            eprintln!("--io-timeout-ms 1500 on {}: {}", kernel_release(), err.trim());
            assert!(!st.success() && out.trim().is_empty(), "--io-timeout-ms without the attribute: {st} {out}");
            assert!(err.contains("no request timeout handler") && err.contains("leave io_timeout"), "{err}");
            assert_no_devices();
        }

        let unpriv = ublk::DevFlags::from_bits_retain(ublk::sys::abi::UBLK_F_UNPRIVILEGED_DEV);
        for (b, needle) in [
            (DeviceBuilder::new().io_timeout(Some(Duration::ZERO)), "not in 1 ms"),
            (DeviceBuilder::new().io_timeout(Some(Duration::from_millis(1 << 31))), "not in 1 ms"),
            (DeviceBuilder::new().unprivileged().io_timeout(Some(Duration::from_secs(5))), "kills its server"),
            (DeviceBuilder::new().flags(unpriv).io_timeout(Some(Duration::from_secs(5))), "kills its server"),
        ] {
            let e = b.size(16 << 20).create().expect_err("a refused io_timeout");
            eprintln!("refused: {e}");
            assert!(e.to_string().contains("io timeout") && e.to_string().contains(needle), "{e}");
        }
        assert_no_devices();

        // A recovery with a bad timeout is refused before it takes the
        // device over: the device stays QUIESCED, and a good one recovers it.
        let d = Daemon::start("ublk", &["add", "-t", "null", "--size", "16M", "--recovery"]);
        let id = d.id();
        d.kill();
        wait_dev_state(id, &["QUIESCED"], Duration::from_secs(15));
        let e = DeviceBuilder::new().io_timeout(Some(Duration::ZERO)).recover(id, Duration::from_secs(5)).expect_err("io_timeout 0");
        assert!(e.to_string().contains("not in 1 ms"), "{e}");
        assert_eq!(dev_state(id), "QUIESCED", "after a refused recovery");
        let timeout = has.then_some(Duration::from_millis(2500));
        let dev = DeviceBuilder::new().io_timeout(timeout).recover(id, Duration::from_secs(5)).unwrap();
        dev.serve(&NullTarget, |dev, stop| {
            if has {
                let p = format!("/sys/block/ublkb{}/queue/io_timeout", dev.id());
                assert_eq!(std::fs::read_to_string(p).unwrap().trim(), "2500", "after the recovery");
            }
            stop.stop();
        })
        .unwrap();
        // The killed CLI daemon's saved configuration (the library, not
        // `ublk recover`, took the device over and deleted it).
        let _ = std::fs::remove_file(format!("/run/ublk/{id}.json"));
        assert_no_devices();

        let (st, out, err) = ublk(&["add", "-t", "null", "--size", "16M", "--io-timeout-ms", "0"]);
        assert!(!st.success() && out.trim().is_empty(), "--io-timeout-ms 0: {st} {out}");
        assert!(err.contains("io timeout") && err.contains("not in 1 ms"), "--io-timeout-ms 0: {err}");
        assert_no_devices();
    }
}

/// (allowed CPUs, scheduling policy) of this process's thread named `name`,
/// from /proc/self/task/*/{comm,status,stat}.
fn thread_placement(name: &str) -> (Vec<usize>, u32) {
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = t.unwrap().path();
        if std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let cpus = cpu_list(status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim());
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the command's closing parenthesis start at field 3;
        // policy is field 41.
        let policy = stat.rsplit_once(')').unwrap().1.split_whitespace().nth(41 - 3).unwrap().parse().unwrap();
        return (cpus, policy);
    }
    panic!("no thread named {name}");
}

/// Child processes, killed and reaped when dropped (also when a check panics).
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads 4k blocks with O_DIRECT from `dev`, pinned to `cpu`, until `done`
/// says so (given the reads so far).
fn read_while(dev: &std::path::Path, cpu: usize, done: impl Fn(u64) -> bool) -> u64 {
    pin_self(cpu);
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(dev).unwrap();
    let mut backing = vec![0u8; 8192];
    let buf = aligned(&mut backing, 4096);
    let mut n = 0u64;
    while !done(n) {
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start((n % 4096) * 4096)).unwrap();
        std::io::Read::read_exact(&mut f, buf).unwrap();
        n += 1;
    }
    n
}

driver_test! {
    /// Placement::Auto against the real block layer's CPU-to-queue map: with
    /// one submitter, on queue 0's CPU, queue 0's thread stays away (on
    /// another CPU, SCHED_OTHER); with a submitter on each queue's CPU, each
    /// queue's thread moves home (to its GET_QUEUE_AFFINITY CPUs, as
    /// SCHED_BATCH), and the stats count the moves. No fixed deadline decides
    /// it: the single submitter reads for at least 400 ms and 2000 reads
    /// (Auto looks every 10 ms), and the threads have up to 30 s to go home
    /// under two submitters (fio at iodepth 32, one per CPU; they need 30 ms
    /// of it), however slow the host.
    fn null_auto_placement_goes_home_when_every_cpu_submits() {
        let dev = DeviceBuilder::new().queues(2).size(16 << 20).data_path(DataPath::NoData).create().unwrap();
        assert_eq!(dev.info().nr_hw_queues, 2, "this test needs 2 CPUs (the kernel gives at most one queue per CPU)");
        let id = dev.id();
        let mut ctrl = ublk::Control::open().unwrap();
        let home: Vec<Vec<usize>> = (0..2).map(|q| ctrl.get_queue_affinity(id, q).unwrap()).collect();
        eprintln!("queue CPUs: {home:?}");
        let stats = dev
            .serve(&NullTarget, |dev, stop| {
                let path = dev.block_path();
                let q0 = format!("ublk{id}-q0");
                // One submitter: queue 1 idle, queue 0's thread stays away.
                let t0 = Instant::now();
                let n = read_while(&path, home[0][0], |n| n >= 2000 && t0.elapsed() >= Duration::from_millis(400));
                let (cpus, policy) = thread_placement(&q0);
                eprintln!("one submitter: {n} reads in {:?}; q0 thread on {cpus:?}, policy {policy}", t0.elapsed());
                assert!(!cpus.iter().any(|c| home[0].contains(c)), "q0 thread on {cpus:?}, its home is {:?}", home[0]);
                assert_eq!(policy, libc::SCHED_OTHER as u32);
                // A submitter on each queue's CPU: both threads go home. Auto
                // counts a queue as busy from ACTIVE_RATE (1000) requests a
                // second: fio at iodepth 32 on each CPU keeps each queue far
                // above that even on a loaded TCG host, where one-at-a-time
                // reads fall below it (a few hundred a second were seen).
                let reads = || -> u64 {
                    let st = std::fs::read_to_string(format!("/sys/block/ublkb{id}/stat")).unwrap();
                    st.split_whitespace().next().unwrap().parse().unwrap()
                };
                let fios = Children(
                    home.iter()
                        .map(|h| {
                            std::process::Command::new("fio")
                                .args(["--name=home", "--rw=randread", "--bs=4k", "--ioengine=io_uring", "--iodepth=32", "--direct=1"])
                                // --thread: the job is a thread of this fio, so killing fio ends it.
                                .args(["--thread", "--time_based", "--runtime=60", "--cpus_allowed", &h[0].to_string()])
                                .arg(format!("--filename={}", path.display()))
                                .stdout(std::process::Stdio::null())
                                .spawn()
                                .expect("spawn fio")
                        })
                        .collect(),
                );
                let (t0, r0) = (Instant::now(), reads());
                let placed = || (0..home.len()).map(|q| thread_placement(&format!("ublk{id}-q{q}"))).collect::<Vec<_>>();
                let home_now = |p: &[(Vec<usize>, u32)]| p.iter().zip(&home).all(|((cpus, policy), h)| cpus == h && *policy == libc::SCHED_BATCH as u32);
                let mut now = placed();
                while !home_now(&now) && t0.elapsed() < Duration::from_secs(30) {
                    std::thread::sleep(Duration::from_millis(20));
                    now = placed();
                }
                let rate = (reads() - r0) as f64 / t0.elapsed().as_secs_f64();
                drop(fios);
                eprintln!("two submitters (fio, iodepth 32): after {:?}, {rate:.0} reads/s on the device, threads at {now:?}", t0.elapsed());
                for (q, ((cpus, policy), h)) in now.iter().zip(&home).enumerate() {
                    assert_eq!(cpus, h, "q{q} should be home ({rate:.0} reads/s on the device; Auto counts a queue busy from 1000/s)");
                    assert_eq!(*policy, libc::SCHED_BATCH as u32, "q{q} should be SCHED_BATCH at home");
                }
                stop.stop();
            })
            .unwrap();
        eprintln!("moves: {:?}", stats.iter().map(|s| s.moves).collect::<Vec<_>>());
        assert!(stats.iter().all(|s| s.moves >= 1), "{stats:?}");
        assert_no_devices();
    }
}
