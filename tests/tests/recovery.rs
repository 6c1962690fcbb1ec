//! User recovery through the `ublk` CLI: the loop daemon is SIGKILLed while
//! fio writes with verify, `ublk recover -n N` takes the device over, and
//! nothing that was reported written is lost.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ublk_tests::*;

driver_test! {
    /// --recovery-reissue: SIGKILL the loop daemon while fio writes with
    /// verify; `ublk recover` takes over; fio completes and verifies; a
    /// verify-only pass on the device and then on the backing file itself
    /// finds every block.
    fn recovery_sigkill_during_fio_reissue_loses_nothing() {
        // The default data path (zero copy with the kernel's registration
        // where it has it), and zero copy with the queue's own registration.
        // And batched commands (UBLK_F_BATCH_IO) where the kernel has them.
        let mut variants: Vec<&[&str]> = vec![&[]];
        if kernel_has(ublk::sys::abi::UBLK_F_SUPPORT_ZERO_COPY) {
            variants.push(&["--data-path", "zero-copy"]);
        }
        if kernel_has(ublk::sys::abi::UBLK_F_BATCH_IO) {
            variants.push(&["--batch"]);
        }
        for extra in variants {
            eprintln!("variant: {extra:?}");
            sigkill_during_fio_reissue(extra);
        }
    }
}

fn sigkill_during_fio_reissue(extra: &[&str]) {
    {
        let backing = PathBuf::from("/tmp/recovery-reissue.img");
        sparse_file(&backing, 64 << 20);
        let mut args = vec!["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--queues", "2", "--recovery-reissue"];
        args.extend_from_slice(extra);
        let d = Daemon::start("ublk", &args);
        let id = d.id();
        let dev = d.dev.to_str().unwrap().to_string();
        let log = PathBuf::from("/tmp/recovery-reissue.fio");
        let mut fio = spawn_fio(&fio_rate_verify_args(&dev, 0, true, &["--do_verify=1"]), &log);
        // Kill after fio's first writes (it writes 4096 at 1000/s): mid-job
        // however slowly the VM starts fio.
        kill_mid_fio(d, &mut fio);
        let t_kill = Instant::now();
        let r = recover(id);
        eprintln!("recovered after {:?}", t_kill.elapsed());
        finish_fio(&mut fio, &log, "the recovery");
        eprintln!("fio across the kill and recovery: ok ({:?} after the kill)", t_kill.elapsed());
        // Everything fio wrote, read again through the recovered device...
        verify_only_all(&dev, true, "verify_only on the device");
        let (st, qout) = r.terminate();
        assert!(st.success(), "recovered daemon exited with {st}");
        eprintln!("recovered daemon: {qout}");
        assert_no_devices();
        // ...and straight from the backing file, with no ublk in between.
        verify_only_all(backing.to_str().unwrap(), false, "verify_only on the backing file");
        let _ = std::fs::remove_file(&backing);
        let _ = std::fs::remove_file(&log);
        delete_all_devices();
        assert_no_devices();
    }
}

driver_test! {
    /// --recovery-fail-io (Linux 6.13+): while the daemon is dead, I/O fails
    /// at once with EIO (fio stops with a clean error, no hang); after
    /// `ublk recover`, data written before the kill is intact.
    fn recovery_fail_io_fails_cleanly_then_recovers() {
        let has = ublk::Control::open().unwrap().features().is_some_and(|f| f.has(ublk::sys::opt::UBLK_F_USER_RECOVERY_FAIL_IO));
        if !has {
            // Kernels before 6.13 lack FAIL_IO: asking for it is refused up
            // front, clearly, and leaves nothing behind.
            let backing = PathBuf::from("/tmp/recovery-failio-old.img");
            sparse_file(&backing, 16 << 20);
            let (st, out, err) = run(bin("ublk").to_str().unwrap(), &["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--recovery-fail-io"]);
            eprintln!("kernel {} without FAIL_IO: {}", kernel_release(), err.trim());
            assert_eq!(st.code(), Some(1), "{out} {err}");
            assert!(err.contains("FAIL_IO"), "the error must name the missing feature: {err}");
            assert!(out.trim().is_empty(), "no device may be reported: {out}");
            assert_no_devices();
            return;
        }
        let backing = PathBuf::from("/tmp/recovery-failio.img");
        sparse_file(&backing, 64 << 20);
        let d = Daemon::start("ublk", &["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--queues", "2", "--recovery-fail-io"]);
        let id = d.id();
        let dev = d.dev.to_str().unwrap().to_string();
        // 8 MiB written and acknowledged before the kill.
        let pat = pattern(8 << 20, 11);
        let pat_path = PathBuf::from("/tmp/recovery-failio.pat");
        std::fs::write(&pat_path, &pat).unwrap();
        run_ok("dd", &[&format!("if={}", pat_path.display()), &format!("of={dev}"), "bs=1M", "oflag=direct", "conv=fsync", "status=none"]);
        let log = PathBuf::from("/tmp/recovery-failio.fio");
        let mut fio = spawn_fio(&fio_rate_verify_args(&dev, 16 << 20, true, &["--do_verify=1"]), &log);
        wait_for_writes(&dev, 200, &mut fio);
        d.kill();
        let st = wait_timeout(&mut fio, Duration::from_secs(60)).unwrap_or_else(|| {
            let _ = fio.kill();
            panic!("fio hung with the daemon dead under FAIL_IO")
        });
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        eprintln!("fio with the daemon dead: {st}");
        assert!(!st.success(), "fio should see I/O errors while no daemon serves the device:\n{out}");
        // Requests in flight at the kill end with EIO; new ones, while the
        // device is FAIL_IO, with BLK_STS_TARGET (EREMOTEIO): both clean errors.
        let clean = |l: &str| l.contains("Input/output error") || l.contains("Remote I/O error");
        assert!(out.lines().any(clean), "fio failed, but not with an I/O error:\n{out}");
        for l in out.lines().filter(|l| l.contains("io_u error")) {
            assert!(clean(l), "fio failed with an unexpected error: {l}\n{out}");
        }
        let t0 = Instant::now();
        while dev_state(id) != "FAIL_IO" && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(dev_state(id), "FAIL_IO");
        let (st, _, err) = run("dd", &[&format!("if={dev}"), "of=/dev/null", "bs=4k", "count=1", "iflag=direct", "status=none"]);
        assert!(!st.success(), "a read succeeded with no daemon under FAIL_IO");
        eprintln!("read with the daemon dead: {}", err.trim());
        let r = recover(id);
        let back = PathBuf::from("/tmp/recovery-failio.back");
        run_ok("dd", &[&format!("if={dev}"), &format!("of={}", back.display()), "bs=1M", "count=8", "iflag=direct", "status=none"]);
        assert!(std::fs::read(&back).unwrap() == pat, "data written before the kill was lost");
        let (st, _) = r.terminate();
        assert!(st.success(), "recovered daemon exited with {st}");
        let _ = std::fs::remove_file(&backing);
        let _ = std::fs::remove_file(&pat_path);
        let _ = std::fs::remove_file(&back);
        let _ = std::fs::remove_file(&log);
        delete_all_devices();
        assert_no_devices();
    }
}

/// `ublk ARGS --detach`: the device id it prints.
fn add_detached(args: &[&str]) -> u32 {
    let (st, out, err) = ublk(args);
    assert!(st.success(), "ublk {args:?}: {st}\n{out}\n{err}");
    let id: u32 = out.trim().parse().unwrap_or_else(|_| panic!("ublk {args:?} printed {out:?}"));
    wait_for_path(Path::new(&format!("/dev/ublkb{id}")));
    id
}

fn daemon_pid(id: u32) -> u32 {
    ublk_cli::config::DeviceConfig::load(id).unwrap().expect("saved configuration").pid
}

fn wait_dead(pid: u32) {
    let t0 = Instant::now();
    while ublk_cli::config::pid_alive(pid) {
        // Exiting tears down the daemon's io_uring and queues: slow under TCG.
        assert!(t0.elapsed() < Duration::from_secs(30), "pid {pid} still alive 30 s after SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }
}

driver_test! {
    /// Detached daemons: a --recovery device's daemon is SIGKILLed and
    /// `ublk recover --detach` brings it back with its data; a device
    /// without recovery whose daemon was killed is listed as dead and
    /// `ublk del` deletes it directly.
    fn recovery_detached_daemon_killed_then_recovered_or_deleted() {
        let f1 = PathBuf::from("/tmp/recovery-detach1.img");
        let f2 = PathBuf::from("/tmp/recovery-detach2.img");
        sparse_file(&f1, 32 << 20);
        sparse_file(&f2, 32 << 20);
        let a = add_detached(&["add", "-t", "loop", "--file", f1.to_str().unwrap(), "--recovery", "--detach"]);
        let b = add_detached(&["add", "-t", "loop", "--file", f2.to_str().unwrap(), "--detach"]);
        let pat = pattern(4 << 20, 5);
        let pat_path = PathBuf::from("/tmp/recovery-detach.pat");
        std::fs::write(&pat_path, &pat).unwrap();
        for id in [a, b] {
            run_ok("dd", &[&format!("if={}", pat_path.display()), &format!("of=/dev/ublkb{id}"), "bs=1M", "oflag=direct", "conv=fsync", "status=none"]);
        }
        let (pa, pb) = (daemon_pid(a), daemon_pid(b));
        for p in [pa, pb] {
            // SAFETY: kill(2) on the daemons this test started.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
        wait_dead(pa);
        wait_dead(pb);
        // The device without recovery is stopped by the kernel (6.1: within
        // its 5 s monitor period); wait for that before listing.
        let t0 = Instant::now();
        while dev_state(b) == "LIVE" && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let list = run_ok(bin("ublk").to_str().unwrap(), &["list"]);
        eprintln!("{list}");
        for id in [a, b] {
            let line = list.lines().find(|l| l.split_whitespace().next() == Some(&id.to_string())).unwrap_or_else(|| panic!("{id} not listed:\n{list}"));
            assert!(line.contains("dead"), "device {id}'s dead daemon not shown as dead: {line}");
        }
        let t = Instant::now();
        let out = add_detached(&["recover", "-n", &a.to_string(), "--detach"]);
        assert_eq!(out, a);
        eprintln!("recovered device {a} in {:?}", t.elapsed());
        assert_eq!(dev_state(a), "LIVE");
        let pa2 = daemon_pid(a);
        assert!(pa2 != pa && ublk_cli::config::pid_alive(pa2), "recovered daemon pid {pa2} (old {pa})");
        let back = PathBuf::from("/tmp/recovery-detach.back");
        run_ok("dd", &[&format!("if=/dev/ublkb{a}"), &format!("of={}", back.display()), "bs=1M", "count=4", "iflag=direct", "status=none"]);
        assert!(std::fs::read(&back).unwrap() == pat, "recovered device {a} lost data");
        // Device b cannot be recovered; it is deleted directly.
        let (st, _, err) = ublk(&["recover", "-n", &b.to_string()]);
        assert_eq!(st.code(), Some(1), "recover of a device without recovery: {err}");
        let (st, out, err) = ublk(&["del", "-n", &b.to_string()]);
        assert!(st.success(), "del of a device whose daemon died: {st}\n{out}\n{err}");
        assert!(ublk_cli::config::DeviceConfig::load(b).unwrap().is_none(), "configuration of {b} left");
        assert_eq!(ublk_devices(), vec![a]);
        let (st, out, err) = ublk(&["del", "--all"]);
        assert!(st.success(), "del --all: {st}\n{out}\n{err}");
        wait_dead(pa2);
        assert!(std::fs::read(&f1).unwrap()[..4 << 20] == pat[..], "backing file of {a} lost data");
        for p in [&f1, &f2, &pat_path, &back] {
            let _ = std::fs::remove_file(p);
        }
        delete_all_devices();
        assert_no_devices();
    }
}

/// clone3's arguments up to `set_tid_size` (CLONE_ARGS_SIZE_VER1, 80 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
}

/// Starts a child process with exactly pid `pid` (clone3 with set_tid, as
/// root), which waits for signals: another process that now holds a dead
/// daemon's pid. Retries while the pid is still taken (the dead daemon not
/// yet reaped by init), up to 30 s.
fn spawn_with_pid(pid: u32) -> i32 {
    let tid = pid as libc::pid_t;
    let args =
        CloneArgs { exit_signal: libc::SIGCHLD as u64, set_tid: &tid as *const libc::pid_t as u64, set_tid_size: 1, ..Default::default() };
    let t0 = Instant::now();
    loop {
        // SAFETY: clone3 without CLONE_VM is a fork: the child has its own
        // copy of this address space and makes only async-signal-safe calls
        // (sigprocmask, pause, _exit) before it dies by a signal.
        let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
        if r == 0 {
            // SAFETY: see above; an empty signal set, then waiting for signals.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                loop {
                    libc::pause();
                }
            }
        }
        if r > 0 {
            assert_eq!(r, i64::from(tid), "clone3 gave pid {r}, not {tid}");
            return r as i32;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        panic!("clone3 with set_tid={pid} (a process reusing the dead daemon's pid): {e}");
    }
}

driver_test! {
    /// A --recovery device's detached daemon is SIGKILLed and its pid goes to
    /// another process (the pid reuse a long-lived host sees). The kernel
    /// still names that pid as the device's server; `ublk list` shows the
    /// daemon dead, and `ublk del` deletes the device without signalling
    /// the other process, saying why.
    fn recovery_del_spares_a_process_that_reused_the_dead_daemons_pid() {
        // The detached daemon is orphaned when `ublk add --detach` exits: as
        // a subreaper, this process inherits it and can reap it at once, so
        // its pid is free for the other process.
        // SAFETY: prctl with integer arguments only.
        assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0, "PR_SET_CHILD_SUBREAPER");
        let id = add_detached(&["add", "-t", "null", "--size", "16M", "--recovery", "--detach"]);
        let cfg = ublk_cli::config::DeviceConfig::load(id).unwrap().expect("saved configuration");
        let pid = cfg.pid;
        let start = ublk_cli::config::process_start_time(pid).expect("the daemon's start time");
        assert_eq!(cfg.pid_start, Some(start), "saved start time of daemon {pid}");
        let mut status = 0;
        // SAFETY: kill(2) and waitpid on the daemon this test started (our
        // child now, as its subreaper), with a live int.
        let reaped = unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
            libc::waitpid(pid as i32, &mut status, 0)
        };
        assert_eq!(reaped, pid as i32, "reaping daemon {pid}: {}", std::io::Error::last_os_error());
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) };
        let imp = spawn_with_pid(pid);
        let imp_start = ublk_cli::config::process_start_time(imp as u32).expect("the new process's start time");
        eprintln!("daemon {pid} (started at tick {start}) killed; pid {imp} now another process (started at tick {imp_start})");
        assert_ne!(imp_start, start);
        let info = ublk::Control::open().unwrap().get_dev_info(id).unwrap();
        assert_eq!(info.ublksrv_pid, pid as i32, "the kernel should still name the dead daemon's pid (state {})", dev_state(id));

        let list = run_ok(bin("ublk").to_str().unwrap(), &["list"]);
        eprintln!("{list}");
        let line = list.lines().find(|l| l.split_whitespace().next() == Some(&id.to_string())).unwrap_or_else(|| panic!("{id} not listed:\n{list}"));
        assert!(line.contains(&format!("{pid}(dead)")), "the daemon of {id} must show as dead, its pid reused: {line}");

        let (st, out, err) = ublk(&["del", "-n", &id.to_string()]);
        eprintln!("ublk del: {}{}", out, err.trim());
        assert!(st.success(), "ublk del -n {id}: {st}\n{out}\n{err}");
        assert!(err.contains(&format!("not signalling pid {pid}")) && err.contains("reused"), "del must say why it did not signal pid {pid}: {err}");
        assert!(!ublk_devices().contains(&id), "device {id} not deleted");
        assert!(ublk_cli::config::DeviceConfig::load(id).unwrap().is_none(), "configuration of {id} left");
        // The other process was not signalled: still running, not exited.
        // SAFETY: waitpid on our own child, with a live int.
        let r = unsafe { libc::waitpid(imp, &mut status, libc::WNOHANG) };
        assert_eq!(r, 0, "pid {imp} (not the daemon) was ended by `ublk del` (wait status {status:#x})");
        assert!(ublk_cli::config::pid_alive(imp as u32));
        // SAFETY: kill(2) and waitpid on our own child.
        unsafe {
            libc::kill(imp, libc::SIGKILL);
            libc::waitpid(imp, &mut status, 0);
        }
        delete_all_devices();
        assert_no_devices();
    }
}

/// The CPUs process `pid` (its main thread) may run on.
fn process_cpus(pid: u32) -> Vec<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    cpu_list(status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim())
}

driver_test! {
    /// `ublk recover` serves the device with what `ublk add` chose, not the
    /// library's defaults: with --placement unpinned the recovered queue
    /// thread may run on every CPU (the default, Auto, pins a one-queue
    /// thread to one CPU), and with --busy-poll-us 0 no request is found by
    /// polling (the default polls 200 us after each batch).
    fn recovery_keeps_placement_and_busy_polling() {
        let d = Daemon::start("ublk", &["add", "-t", "null", "--size", "16M", "--recovery", "--placement", "unpinned", "--busy-poll-us", "0"]);
        let id = d.id();
        let q0 = format!("ublk{id}-q0");
        // Unpinned threads keep the process's CPUs; Auto pins a one-queue
        // thread to one CPU.
        let all = process_cpus(d.child.id());
        assert_eq!(all.len(), nproc(), "the daemon may run on {all:?}");
        let cfg = ublk_cli::config::DeviceConfig::load(id).unwrap().expect("saved configuration");
        assert_eq!((cfg.placement, cfg.busy_poll_us), (ublk_cli::PlacementArg::Unpinned, 0), "{cfg:?}");
        assert_eq!(thread_cpus(d.child.id(), &q0), all, "unpinned queue thread of the first daemon");
        d.kill();
        let r = recover(id);
        let pid = r.child.id();
        assert_eq!(process_cpus(pid), all, "the recovered daemon's own CPUs");
        let cpus = thread_cpus(pid, &q0);
        eprintln!("recovered daemon {pid}: {q0} may run on {cpus:?} of {all:?}");
        if all.len() < 2 {
            eprintln!("NOTE: one CPU: every placement gives the same CPU set; only busy polling is checked here");
        }
        assert_eq!(cpus, all, "the recovered device lost --placement unpinned");
        let cfg = ublk_cli::config::DeviceConfig::load(id).unwrap().expect("saved configuration after recovery");
        assert_eq!((cfg.placement, cfg.busy_poll_us, cfg.pid), (ublk_cli::PlacementArg::Unpinned, 0, pid), "{cfg:?}");
        assert_eq!(cfg.pid_start, ublk_cli::config::process_start_time(pid), "{cfg:?}");
        // One request at a time: each arrives after the queue thread's batch.
        run_ok("dd", &[&format!("if=/dev/ublkb{id}"), "of=/dev/null", "bs=4k", "count=500", "iflag=direct", "status=none"]);
        let (st, out) = r.terminate();
        assert!(st.success(), "recovered daemon exited with {st}");
        eprintln!("{out}");
        assert!(queue_sum(&out, "reads") >= 500, "{out}");
        assert_eq!(queue_sum(&out, "polled"), 0, "the recovered device polls: it lost --busy-poll-us 0: {out}");
        delete_all_devices();
        assert_no_devices();
    }
}
