//! Unprivileged devices (`UBLK_F_UNPRIVILEGED_DEV`, Linux 6.3+) and proof
//! that nobody reaches a device that is not theirs, with two ordinary users
//! A (uid 1000) and B (uid 1001) against the real kernel.
//!
//! The VM has no udevd, so each test applies the rules of
//! `docs/unprivileged.md` itself, exactly as udev would: `/dev/ublk-control`
//! gets mode 0666 (`KERNEL=="ublk-control", MODE="0666"`), and a thread
//! watches for new `ublkcN`/`ublkbN` nodes, runs the rule's program
//! (`ublk udev-owner NAME`, as root) and applies what it prints (OWNER,
//! GROUP, MODE 0600) to the node. Users run the `ublk` CLI, fio and
//! `ublk-probe` (one library call, printing the errno it got) as real
//! processes with their uid and gid.
//!
//! On kernels before 6.3 every test asserts the clear refusal instead.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ublk_tests::*;

const A: u32 = 1000;
const B: u32 = 1001;

/// The rules of docs/unprivileged.md, applied while it lives.
struct Rules {
    stop: Arc<AtomicBool>,
    /// While set, new nodes are left as the kernel made them (no udev rule).
    paused: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    control_mode: u32,
}

impl Rules {
    fn apply() -> Rules {
        let control_mode = std::fs::metadata("/dev/ublk-control").unwrap().permissions().mode() & 0o7777;
        // KERNEL=="ublk-control", MODE="0666"
        std::fs::set_permissions("/dev/ublk-control", std::fs::Permissions::from_mode(0o666)).unwrap();
        for u in [A, B] {
            let d = xdg(u);
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&d, Some(u), Some(u)).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let paused = Arc::new(AtomicBool::new(false));
        let p2 = paused.clone();
        let thread = std::thread::spawn(move || {
            // name -> inode of the node the rule was applied to
            let mut done: HashMap<String, u64> = HashMap::new();
            while !s2.load(Ordering::Relaxed) {
                let mut names: Vec<String> = vec![];
                for dir in ["/sys/class/ublk-char", "/sys/block"] {
                    if let Ok(rd) = std::fs::read_dir(dir) {
                        names.extend(
                            rd.filter_map(|e| e.ok())
                                .map(|e| e.file_name().to_string_lossy().into_owned())
                                .filter(|n| n.starts_with("ublkc") || n.starts_with("ublkb")),
                        );
                    }
                }
                done.retain(|n, _| names.contains(n));
                for n in names.into_iter().filter(|_| !p2.load(Ordering::Relaxed)) {
                    let node = format!("/dev/{n}");
                    let Ok(m) = std::fs::metadata(&node) else { continue };
                    if done.get(&n) == Some(&m.ino()) {
                        continue;
                    }
                    // IMPORT{program}="ublk udev-owner %k"
                    let Ok(out) = Command::new(bin("ublk")).args(["udev-owner", &n]).output() else { continue };
                    if !out.status.success() {
                        continue; // the device is going away: look again
                    }
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix('=')?.parse::<u32>().ok());
                    if let (Some(uid), Some(gid)) = (get("UBLK_OWNER_UID"), get("UBLK_OWNER_GID")) {
                        // OWNER="$env{UBLK_OWNER_UID}", GROUP="$env{UBLK_OWNER_GID}", MODE="0600"
                        std::os::unix::fs::chown(&node, Some(uid), Some(gid)).unwrap();
                        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o600)).unwrap();
                    }
                    done.insert(n, m.ino());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Rules { stop, paused, thread: Some(thread), control_mode }
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::set_permissions("/dev/ublk-control", std::fs::Permissions::from_mode(self.control_mode));
        delete_all_devices();
    }
}

/// A user's `XDG_RUNTIME_DIR`.
fn xdg(uid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/ublk-xdg-{uid}"))
}

/// `program args...` as `uid` (gid = uid, no supplementary groups), with
/// that user's runtime directory.
fn as_user(uid: u32, program: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args).uid(uid).gid(uid).env("XDG_RUNTIME_DIR", xdg(uid)).env_remove("UBLK_RUN_DIR").current_dir(xdg(uid));
    c
}

fn output(mut c: Command) -> (ExitStatus, String, String) {
    let out = c.output().expect("run as user");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `ublk ARGS` as `uid`.
fn ublk_as(uid: u32, args: &[&str]) -> (ExitStatus, String, String) {
    output(as_user(uid, &bin("ublk"), args))
}

/// `ublk-probe ARGS` as `uid`: Ok(detail) or Err((errno, message)).
fn probe(uid: u32, args: &[&str]) -> Result<String, (i32, String)> {
    let (st, out, err) = output(as_user(uid, &bin("ublk-probe"), args));
    assert!(st.success(), "ublk-probe {args:?} as uid {uid}: {st}\n{out}\n{err}");
    let line = out.lines().next().unwrap_or("").to_string();
    if let Some(ok) = line.strip_prefix("ok ") {
        return Ok(ok.to_string());
    }
    let rest = line.strip_prefix("err errno=").unwrap_or_else(|| panic!("ublk-probe {args:?}: unexpected output {out:?} {err}"));
    let (n, msg) = rest.split_once(' ').unwrap_or((rest, ""));
    Err((n.parse().unwrap(), msg.to_string()))
}

/// Asserts that `uid`'s probe `args` was refused with EACCES or EPERM; returns the message.
fn refused(uid: u32, args: &[&str]) -> String {
    match probe(uid, args) {
        Ok(d) => panic!("uid {uid}: {args:?} succeeded ({d}); it must be refused"),
        Err((e, msg)) => {
            assert!(e == libc::EACCES || e == libc::EPERM, "uid {uid}: {args:?} failed with errno {e}, not EACCES/EPERM: {msg}");
            eprintln!("uid {uid}: {args:?} refused (errno {e}): {msg}");
            msg
        }
    }
}

fn kernel_has_unprivileged() -> bool {
    kernel_version() >= (6, 3)
}

/// Before 6.3: an ordinary user's `ublk add --unprivileged` and root's
/// `DeviceBuilder::unprivileged` are refused, naming the kernel needed.
fn assert_refused_before_6_3() {
    let (st, _, err) = ublk_as(A, &["add", "--unprivileged", "-t", "null", "--size", "16M"]);
    assert!(!st.success(), "ublk add --unprivileged worked on {}", kernel_release());
    assert!(err.contains("Linux 6.3"), "the refusal must name the kernel needed: {err}");
    let e = ublk::DeviceBuilder::new().unprivileged().size(16 << 20).create().unwrap_err();
    assert!(matches!(e, ublk::Error::Unsupported { .. }) && e.to_string().contains("Linux 6.3"), "{e}");
    eprintln!("kernel {}: unprivileged devices refused: {err}", kernel_release());
    assert_no_devices();
}

/// A's foreground `ublk add --unprivileged ARGS` daemon.
fn start_a(args: &[&str]) -> Daemon {
    let mut v = vec!["add", "--unprivileged"];
    v.extend_from_slice(args);
    Daemon::spawn(as_user(A, &bin("ublk"), &v), &format!("ublk {v:?} as uid {A}"))
}

fn node_owner(p: &str) -> (u32, u32, u32) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// Waits (up to 10 s) until the rules gave `/dev/ublk[cb]ID` to A.
fn wait_nodes_owned(id: u32, uid: u32) {
    let t0 = Instant::now();
    for p in [format!("/dev/ublkc{id}"), format!("/dev/ublkb{id}")] {
        while node_owner(&p) != (uid, uid, 0o600) {
            assert!(t0.elapsed() < Duration::from_secs(10), "{p} is {:?}, not owned by {uid} with mode 0600", node_owner(&p));
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The device's info as root sees it (root sends the path too).
fn root_info(id: u32) -> ublk::DevInfo {
    ublk::Control::open().unwrap().get_dev_info(id).unwrap()
}

/// fio as A: 4k random writes with crc32c verify over 8 MiB, rate-limited
/// (about 20 s of writes; the verify reads are not limited) so that it
/// outlasts B's attempts, a few seconds, even on a busy host.
fn spawn_fio_as_a(dev: &str, log: &Path) -> Child {
    let args = [
        "--name=unpriv",
        &format!("--filename={dev}"),
        "--rw=randwrite",
        "--bs=4k",
        "--size=8M",
        "--ioengine=io_uring",
        "--direct=1",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--verify_state_save=0",
        "--rate_iops=100",
    ];
    let mut c = as_user(A, Path::new("fio"), &args);
    c.stdout(std::fs::File::create(log).unwrap()).stderr(Stdio::inherit());
    c.spawn().expect("spawn fio as A")
}

fn writes_completed(id: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/sys/block/ublkb{id}/stat")).unwrap_or_default();
    stat.split_whitespace().nth(4).and_then(|n| n.parse().ok()).unwrap_or(0)
}

driver_test! {
    /// A creates, serves and fio-verifies an unprivileged device; while
    /// fio runs, B can open neither of its nodes nor stop, delete, recover,
    /// read or set its parameters, or read its info (each refused by the
    /// kernel with EACCES, or EPERM for a path naming another node), and
    /// fio is unaffected; A deletes it.
    fn unpriv_owner_serves_others_are_refused() {
        let _rules = Rules::apply();
        if !kernel_has_unprivileged() {
            return assert_refused_before_6_3();
        }
        let d = start_a(&["-t", "ramdisk", "--size", "32M"]);
        let id = d.id();
        let dev = d.dev.to_str().unwrap().to_string();
        wait_nodes_owned(id, A);
        let info = root_info(id);
        assert_ne!(info.flags & ublk::sys::abi::UBLK_F_UNPRIVILEGED_DEV, 0, "flags {:#x}", info.flags);
        assert_eq!(info.owner(), Some((A, A)), "the kernel records the creator as the owner");
        assert_eq!(info.ublksrv_pid, d.child.id() as i32);
        // A's list shows the owner and the flag.
        let (st, out, err) = ublk_as(A, &["list", "--json"]);
        assert!(st.success(), "{err}");
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        let row = rows.as_array().unwrap().iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("device {id} not in {out}"));
        assert_eq!((row["owner_uid"].as_u64(), row["owner_gid"].as_u64(), row["unprivileged"].as_bool()), (Some(1000), Some(1000), Some(true)), "{row}");
        assert_eq!(row["target"], "ramdisk", "A's own saved configuration ($XDG_RUNTIME_DIR/ublk): {row}");
        assert!(xdg(A).join(format!("ublk/{id}.json")).exists(), "A's state is in A's XDG_RUNTIME_DIR");

        let log = xdg(A).join("fio.log");
        let mut fio = spawn_fio_as_a(&dev, &log);
        let t0 = Instant::now();
        while writes_completed(id) < 200 {
            assert!(fio.try_wait().unwrap().is_none(), "fio ended early: {}", std::fs::read_to_string(&log).unwrap_or_default());
            assert!(t0.elapsed() < Duration::from_secs(60), "fio wrote nothing to {dev} in 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        // B, while A's fio writes and verifies.
        let c = format!("/dev/ublkc{id}");
        let ids = id.to_string();
        for (node, mode) in [(c.as_str(), "rw"), (dev.as_str(), "ro"), (dev.as_str(), "rw")] {
            match probe(B, &["open", node, mode]) {
                Err((e, _)) => assert_eq!(e, libc::EACCES, "B opening {node} {mode}"),
                Ok(_) => panic!("B opened {node} {mode}"),
            }
        }
        let msg = refused(B, &["info", &ids]);
        assert!(msg.contains("owned by uid 1000 gid 1000"), "the error names the owner: {msg}");
        for cmd in ["params", "set-params", "stop", "del", "start-recovery", "affinity"] {
            let msg = refused(B, &[cmd, &ids]);
            assert!(msg.contains("uid 1000 gid 1000"), "{cmd}: the error names the owner: {msg}");
        }
        let msg = refused(B, &["recover", &ids]);
        assert!(msg.contains("uid 1000"), "recover: {msg}");
        // The kernel checks the node the path names, not just the path:
        // B's read/write /dev/null is not device N's node (EPERM), and the
        // real node's mode refuses B (EACCES).
        match probe(B, &["raw-path", "STOP_DEV", &ids, "/dev/null"]) {
            Err((e, _)) => assert_eq!(e, libc::EPERM, "STOP_DEV with /dev/null as the path"),
            Ok(d) => panic!("STOP_DEV of A's device with /dev/null as the path worked: {d}"),
        }
        match probe(B, &["raw-path", "DEL_DEV", &ids, &c]) {
            Err((e, _)) => assert_eq!(e, libc::EACCES, "DEL_DEV with the real path"),
            Ok(d) => panic!("B's DEL_DEV of A's device worked: {d}"),
        }
        // Without a path the command is malformed for an unprivileged device.
        match probe(B, &["raw-nopath", "STOP_DEV", &ids]) {
            Err((e, _)) => assert_eq!(e, libc::EINVAL, "STOP_DEV without a path"),
            Ok(d) => panic!("B's STOP_DEV without a path worked: {d}"),
        }
        // B's CLI says whose device it is.
        for args in [vec!["del", "-n", &ids], vec!["recover", "-n", &ids]] {
            let (st, _, err) = ublk_as(B, &args);
            assert!(!st.success(), "B: ublk {args:?} worked");
            assert!(err.contains("uid 1000 gid 1000") && err.contains("refused"), "B: ublk {args:?}: {err}");
        }
        let (st, out, err) = ublk_as(B, &["list"]);
        assert!(st.success(), "B: ublk list: {err}");
        let line = out.lines().find(|l| l.split_whitespace().next() == Some(ids.as_str())).unwrap_or_else(|| panic!("{out}"));
        assert!(line.contains("no-access") && line.contains("1000:1000") && line.contains("another user"), "B's list: {line}");
        let (st, _, err) = ublk_as(B, &["del", "--all"]);
        assert!(st.success() && err.contains(&format!("skipping device {id}")), "B: ublk del --all: {err}");
        // Nothing B did reached the device.
        let after = root_info(id);
        assert_eq!((ublk::ctrl::state_name(after.state), after.ublksrv_pid), ("LIVE", info.ublksrv_pid));
        assert!(fio.try_wait().unwrap().is_none(), "fio finished before B was done: make it longer");
        let st = wait_timeout(&mut fio, Duration::from_secs(240)).expect("fio did not finish within 240 s");
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(st.success(), "A's fio verify failed ({st}):\n{out}");
        assert!(out.lines().filter(|l| l.contains("err=")).all(|l| l.contains("err= 0")), "{out}");
        let verified = out.lines().find_map(|l| l.trim().strip_prefix("issued rwts: total=")).and_then(|t| t.split(',').next()?.parse::<u64>().ok());
        assert_eq!(verified, Some(2048), "fio read back all 2048 blocks: {out}");
        eprintln!("A's fio (randwrite + crc32c verify of 2048 blocks) passed, {:?} after it started", t0.elapsed());
        // A deletes its device: the daemon is told, and everything goes.
        let (st, out, err) = ublk_as(A, &["del", "-n", &ids]);
        assert!(st.success(), "A: ublk del: {out} {err}");
        let (st, _) = d.terminate();
        assert!(st.success(), "A's daemon exited with {st}");
        assert_no_devices();
        assert!(!xdg(A).join(format!("ublk/{id}.json")).exists(), "A's configuration left behind");
    }
}

driver_test! {
    /// An ordinary user cannot create a privileged device, nor an
    /// unprivileged one with what the kernel keeps for privileged ones
    /// (user copy: refused; user recovery: dropped), nor use root's state
    /// directory; root asking for an unprivileged device gets a privileged
    /// one from the kernel, which the library reports.
    fn unpriv_user_cannot_reach_root_powers() {
        let rules = Rules::apply();
        if !kernel_has_unprivileged() {
            return assert_refused_before_6_3();
        }
        // A privileged device.
        match probe(A, &["create"]) {
            Err((e, msg)) => {
                assert_eq!(e, libc::EPERM, "{msg}");
                assert!(msg.contains("ADD_DEV of a privileged device") && msg.contains("unprivileged"), "{msg}");
            }
            Ok(d) => panic!("A created a privileged device: {d}"),
        }
        let (st, _, err) = ublk_as(A, &["add", "-t", "null", "--size", "16M"]);
        assert!(!st.success() && err.contains("--unprivileged"), "A: ublk add without --unprivileged: {err}");
        // USER_COPY: the kernel refuses it (raw ADD_DEV), the library says why first.
        let uc = ublk::sys::abi::UBLK_F_USER_COPY;
        let unp = ublk::sys::abi::UBLK_F_UNPRIVILEGED_DEV;
        match probe(A, &["add-raw", &format!("{:x}", unp | uc)]) {
            Err((e, msg)) => assert_eq!(e, libc::EINVAL, "the kernel's answer to UNPRIVILEGED_DEV|USER_COPY: {msg}"),
            Ok(d) => panic!("the kernel took USER_COPY for an unprivileged device: {d}"),
        }
        match probe(A, &["create", "unprivileged", &format!("{uc:x}")]) {
            Err((_, msg)) => assert!(msg.contains("UBLK_F_USER_COPY is refused by the kernel for unprivileged devices"), "{msg}"),
            Ok(d) => panic!("{d}"),
        }
        // USER_RECOVERY: the kernel drops it (raw ADD_DEV), the library reports it and deletes the device.
        let rec = ublk::sys::abi::UBLK_F_USER_RECOVERY;
        match probe(A, &["add-raw", &format!("{:x}", unp | rec)]) {
            Ok(d) => {
                let flags = u64::from_str_radix(d.split("flags=0x").nth(1).unwrap().split_whitespace().next().unwrap(), 16).unwrap();
                assert_eq!(flags & rec, 0, "the kernel kept USER_RECOVERY for an unprivileged device: {d}");
                assert_ne!(flags & unp, 0, "{d}");
                eprintln!("kernel: ADD_DEV(UNPRIVILEGED_DEV|USER_RECOVERY) as uid {A} -> {d}");
            }
            Err(e) => panic!("{e:?}"),
        }
        match probe(A, &["create", "unprivileged", &format!("{rec:x}")]) {
            Err((_, msg)) => assert!(msg.contains("dropped UBLK_F_USER_RECOVERY") && msg.contains("device was deleted"), "{msg}"),
            Ok(d) => panic!("{d}"),
        }
        let (st, _, err) = ublk_as(A, &["add", "--unprivileged", "--recovery", "-t", "null", "--size", "16M"]);
        assert!(!st.success() && err.contains("no user recovery"), "{err}");
        assert_no_devices();
        // Root's state directory is root's: A may read it, never write it.
        ublk_cli::config::ensure_run_dir().unwrap();
        let root_dir = ublk_cli::config::run_dir().unwrap();
        assert_eq!(node_owner(root_dir.to_str().unwrap()), (0, 0, 0o755));
        let mut c = as_user(A, &bin("ublk"), &["add", "--unprivileged", "-t", "null", "--size", "16M"]);
        c.env("UBLK_RUN_DIR", &root_dir);
        let (st, _, err) = output(c);
        assert!(!st.success() && err.contains("belongs to uid 0"), "A using {}: {err}", root_dir.display());
        // Without XDG_RUNTIME_DIR an ordinary user has no state directory.
        let mut c = as_user(A, &bin("ublk"), &["add", "--unprivileged", "-t", "null", "--size", "16M"]);
        c.env_remove("XDG_RUNTIME_DIR");
        let (st, _, err) = output(c);
        assert!(!st.success() && err.contains("XDG_RUNTIME_DIR is not set"), "{err}");
        // A configuration file that is neither the reader's nor root's is
        // not trusted (root reading a file of B's in a directory of root's),
        // nor is a directory of someone else's (root reading A's).
        let e = ublk_cli::config::DeviceConfig::load_in(&xdg(A), 7).unwrap_err();
        assert!(e.contains("belongs to uid 1000") && e.contains("refusing"), "{e}");
        let dir = PathBuf::from("/tmp/ublk-root-cfg");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let planted = dir.join("7.json");
        std::fs::write(&planted, r#"{"id": 7, "target": "null", "file": null, "size": 1048576, "block_size": 512, "queues": 1, "depth": 1, "flags": 0, "flag_names": [], "direct": false, "pid": 1}"#).unwrap();
        std::os::unix::fs::chown(&planted, Some(B), Some(B)).unwrap();
        let e = ublk_cli::config::DeviceConfig::load_in(&dir, 7).unwrap_err();
        assert!(e.contains("belongs to uid 1001") && e.contains("refusing"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        // Root asking for an unprivileged device: the kernel makes it privileged.
        let e = ublk::DeviceBuilder::new().unprivileged().size(16 << 20).create().unwrap_err();
        assert!(e.to_string().contains("a privileged device") && e.to_string().contains("CAP_SYS_ADMIN"), "{e}");
        assert_no_devices();
        // Root's privileged device: A may not read or stop it (EPERM: no
        // CAP_SYS_ADMIN), and A's list says whose kind it is.
        let root_dev = ublk::DeviceBuilder::new().size(16 << 20).depth(16).create().unwrap();
        let rid = root_dev.id().to_string();
        for cmd in ["info", "stop", "del"] {
            let msg = refused(A, &[cmd, &rid]);
            assert!(msg.contains("privileged device") && msg.contains("CAP_SYS_ADMIN"), "{cmd}: {msg}");
        }
        let (st, out, err) = ublk_as(A, &["list"]);
        assert!(st.success(), "{err}");
        assert!(out.lines().any(|l| l.split_whitespace().next() == Some(rid.as_str()) && l.contains("root only")), "A's list: {out}");
        drop(root_dev);
        assert_no_devices();
        // Without the control node's rule: the error names the rule and the chmod.
        std::fs::set_permissions("/dev/ublk-control", std::fs::Permissions::from_mode(0o600)).unwrap();
        let (st, _, err) = ublk_as(A, &["features"]);
        std::fs::set_permissions("/dev/ublk-control", std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(!st.success(), "A opened /dev/ublk-control with mode 0600");
        assert!(err.contains(r#"KERNEL=="ublk-control", MODE="0666""#) && err.contains("chmod 0666 /dev/ublk-control"), "{err}");
        // Without the rule for the device's nodes: A's ADD_DEV works, but
        // the node stays root's; after NODE_WAIT the error says which rule
        // is missing and that only root can delete the device now.
        rules.paused.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        let (st, _, err) = ublk_as(A, &["add", "--unprivileged", "-t", "null", "--size", "16M"]);
        rules.paused.store(false, Ordering::Relaxed);
        assert!(!st.success(), "ublk add without the udev rule worked");
        assert!(t0.elapsed() >= ublk::NODE_WAIT, "gave up after {:?}", t0.elapsed());
        assert!(err.contains("not readable and writable by uid 1000") && err.contains("udev rule") && err.contains("as root"), "{err}");
        let left = ublk_devices();
        assert_eq!(left.len(), 1, "the device whose node never became A's: {left:?}");
        let out = run_ok(bin("ublk").to_str().unwrap(), &["del", "-n", &left[0].to_string()]);
        assert!(out.contains("deleted device"), "{out}");
        assert_no_devices();
    }
}

driver_test! {
    /// Root lists A's device (with its owner) and deletes it; A's daemon
    /// then ends.
    fn unpriv_root_lists_and_deletes_a_users_device() {
        let _rules = Rules::apply();
        if !kernel_has_unprivileged() {
            return assert_refused_before_6_3();
        }
        let mut d = start_a(&["-t", "null", "--size", "64M"]);
        let id = d.id();
        wait_nodes_owned(id, A);
        let out = run_ok(bin("ublk").to_str().unwrap(), &["list", "--json"]);
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        let row = rows.as_array().unwrap().iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("{out}"));
        assert_eq!((row["owner_uid"].as_u64(), row["owner_gid"].as_u64(), row["access"].as_bool()), (Some(1000), Some(1000), Some(true)), "{row}");
        assert_eq!(row["state"], "LIVE");
        let out = run_ok(bin("ublk").to_str().unwrap(), &["list"]);
        assert!(out.lines().any(|l| l.split_whitespace().next() == Some(&id.to_string()) && l.contains("1000:1000")), "{out}");
        // The kernel's limit of unprivileged devices counts every user's:
        // with it at 1, A's device leaves B none (ADD_DEV: EACCES).
        let param = "/sys/module/ublk_drv/parameters/ublks_max";
        if let Ok(max) = std::fs::read_to_string(param) {
            std::fs::write(param, "1").unwrap();
            let r = probe(B, &["create", "unprivileged"]);
            std::fs::write(param, max.trim()).unwrap();
            match r {
                Err((_, msg)) => assert!(msg.contains("limit of unprivileged ublk devices is reached") && msg.contains("ublks_max"), "{msg}"),
                Ok(d) => panic!("B created a device beyond the limit: {d}"),
            }
        } else {
            skipped_part("no /sys/module/ublk_drv/parameters/ublks_max (ublk_drv built in)");
        }
        let out = run_ok(bin("ublk").to_str().unwrap(), &["del", "-n", &id.to_string()]);
        assert!(out.contains(&format!("deleted device {id}")), "{out}");
        let st = wait_timeout(&mut d.child, Duration::from_secs(60)).expect("A's daemon did not end after root deleted its device");
        eprintln!("A's daemon after root's del: {st}");
        assert_no_devices();
    }
}

driver_test! {
    /// A's daemon is killed: the kernel stops the device (unprivileged
    /// devices have no user recovery). B may neither recover nor delete
    /// it; A's recover is refused with the reason (past the permission
    /// check: the kernel's START_USER_RECOVERY answers A with EINVAL, B
    /// with EACCES); A deletes it.
    fn unpriv_killed_daemon_owner_cleans_up_stranger_cannot() {
        let _rules = Rules::apply();
        if !kernel_has_unprivileged() {
            return assert_refused_before_6_3();
        }
        let mut d = start_a(&["-t", "null", "--size", "64M"]);
        let id = d.id();
        let ids = id.to_string();
        wait_nodes_owned(id, A);
        d.signal(libc::SIGKILL);
        let _ = d.child.wait();
        let t0 = Instant::now();
        while ublk::ctrl::state_name(root_info(id).state) == "LIVE" {
            assert!(t0.elapsed() < Duration::from_secs(30), "device {id} still LIVE 30 s after its daemon was killed");
            std::thread::sleep(Duration::from_millis(50));
        }
        let state = ublk::ctrl::state_name(root_info(id).state);
        eprintln!("device {id} after SIGKILL of its daemon: {state}");
        assert_eq!(state, "DEAD", "an unprivileged device has no recovery: the kernel stops it");
        // B: nothing.
        let (st, _, err) = ublk_as(B, &["recover", "-n", &ids]);
        assert!(!st.success() && err.contains("uid 1000 gid 1000"), "B: ublk recover: {err}");
        refused(B, &["start-recovery", &ids]);
        refused(B, &["recover", &ids]);
        refused(B, &["del", &ids]);
        // A: the kernel lets A past the permission check, and says no recovery.
        match probe(A, &["start-recovery", &ids]) {
            Err((e, msg)) => assert_eq!(e, libc::EINVAL, "A's START_USER_RECOVERY: {msg}"),
            Ok(d) => panic!("{d}"),
        }
        match probe(A, &["recover", &ids]) {
            Err((_, msg)) => assert!(msg.contains("unprivileged device") && msg.contains("no user recovery"), "{msg}"),
            Ok(d) => panic!("{d}"),
        }
        let (st, _, err) = ublk_as(A, &["recover", "-n", &ids]);
        assert!(!st.success() && err.contains("no user recovery"), "A: ublk recover: {err}");
        // DEL_DEV_ASYNC is not among the commands the kernel checks for an
        // unprivileged device: the library names DEL_DEV instead of sending it.
        match probe(A, &["del-async", &ids]) {
            Err((_, msg)) => assert!(msg.contains("accepts only DEL_DEV"), "{msg}"),
            Ok(d) => panic!("{d}"),
        }
        let (st, out, err) = ublk_as(A, &["del", "-n", &ids]);
        assert!(st.success(), "A: ublk del: {out} {err}");
        assert_no_devices();
    }
}
