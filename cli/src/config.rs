//! The configuration `ublk add` persists for each live device, as JSON at
//! `<run dir>/<id>.json`: what `ublk list` shows and what `ublk recover`
//! serves again.
//!
//! The run directory is `$UBLK_RUN_DIR` when that is set, else `/run/ublk`
//! for root and `$XDG_RUNTIME_DIR/ublk` for everyone else (an ordinary user
//! keeps the state of their unprivileged devices there; without
//! `XDG_RUNTIME_DIR` there is none, and the error says so). The directory
//! must belong to the caller and be writable by nobody else (root's is made
//! 0755, a user's 0700). A file in it is trusted only if it belongs to the
//! caller or root, is writable by nobody else, parses, and names the device
//! it is read for; anything else is refused with the reason.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::PlacementArg;

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Directory of the persisted configurations and daemon logs (see the
/// module docs); an error says why there is none.
pub fn run_dir() -> Result<PathBuf, String> {
    run_dir_for(euid(), std::env::var_os("UBLK_RUN_DIR"), std::env::var_os("XDG_RUNTIME_DIR"))
}

/// [`run_dir`] for a caller `uid` and the two variables.
pub fn run_dir_for(uid: u32, ublk_run_dir: Option<std::ffi::OsString>, xdg: Option<std::ffi::OsString>) -> Result<PathBuf, String> {
    if let Some(d) = ublk_run_dir.filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if uid == 0 {
        return Ok(PathBuf::from("/run/ublk"));
    }
    match xdg.filter(|d| !d.is_empty()) {
        Some(d) if Path::new(&d).is_absolute() => Ok(PathBuf::from(d).join("ublk")),
        Some(d) => Err(format!("XDG_RUNTIME_DIR ({}) is not an absolute path; fix it, or set UBLK_RUN_DIR", Path::new(&d).display())),
        None => Err(format!(
            "XDG_RUNTIME_DIR is not set, so uid {uid} has no directory for its devices' state (/run/ublk is root's): log in through a session that sets it (systemd-logind: /run/user/{uid}), or set UBLK_RUN_DIR to a directory of your own"
        )),
    }
}

/// Creates the run directory if needed (0755 for root, 0700 for others,
/// whatever the umask) and checks that it is the caller's and writable by
/// nobody else.
pub fn ensure_run_dir() -> Result<PathBuf, String> {
    let dir = run_dir()?;
    let mode = if euid() == 0 { 0o755 } else { 0o700 };
    match std::fs::DirBuilder::new().recursive(false).mode(mode).create(&dir) {
        Ok(()) => {
            // The umask may have taken bits away; set exactly this mode.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("setting the mode of {}: {e}", dir.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(format!(
                "creating {}: {e} (uid {} may not write there; set UBLK_RUN_DIR to a directory of your own)",
                dir.display(),
                euid()
            ))
        }
        Err(e) => return Err(format!("creating {}: {e}", dir.display())),
    }
    check_dir(&dir)?;
    let owner = std::fs::symlink_metadata(&dir).map(|m| m.uid()).unwrap_or(u32::MAX);
    if owner != euid() {
        return Err(format!(
            "{} belongs to uid {owner}: uid {} cannot keep its devices' state there (only read it); use $XDG_RUNTIME_DIR or set UBLK_RUN_DIR to a directory of your own",
            dir.display(),
            euid()
        ));
    }
    Ok(dir)
}

/// The run directory must be a real directory of the caller's (or root's),
/// writable by nobody else.
fn check_dir(dir: &Path) -> Result<(), String> {
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let me = euid();
    if !m.is_dir() {
        return Err(format!("{} is not a directory (a symlink?): refusing to keep device state there", dir.display()));
    }
    if m.uid() != me && m.uid() != 0 {
        return Err(format!(
            "{} belongs to uid {}, not to the caller (uid {me}) or root: refusing to trust the device state in it; remove it or set UBLK_RUN_DIR",
            dir.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by others (mode {:04o}): anyone could plant a device configuration there; `chmod go-w {}`",
            dir.display(),
            m.mode() & 0o7777,
            dir.display()
        ));
    }
    Ok(())
}

/// A device's persisted configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// Device id (N of /dev/ublkbN).
    pub id: u32,
    /// `null`, `ramdisk`, `loop`, `stripe` or `nbd`.
    pub target: String,
    /// Backing file of a loop device (absolute path).
    pub file: Option<PathBuf>,
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Hardware queues, as the kernel made them.
    pub queues: u16,
    /// Tags per queue.
    pub depth: u16,
    /// Threads serving each queue (`--threads-per-queue`); a recovered
    /// device keeps it. Older configurations: 1.
    #[serde(default = "one")]
    pub threads_per_queue: u16,
    /// `UBLK_F_*` flags the device has (as ADD_DEV returned them).
    pub flags: u64,
    /// Those flags by name.
    pub flag_names: Vec<String>,
    /// Backing file opened with O_DIRECT.
    pub direct: bool,
    /// Pid of the serving daemon.
    pub pid: u32,
    /// Start time of the daemon (field 22 of `/proc/PID/stat`, clock ticks
    /// since boot): tells the daemon from a process that reuses its pid
    /// after it died. `None` in configurations written before it was kept.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// Where the daemon's queue threads run (`--placement`); a recovered
    /// device keeps it. Older configurations: the default.
    #[serde(default)]
    pub placement: PlacementArg,
    /// The daemon's busy polling in microseconds (`--busy-poll-us`); a
    /// recovered device keeps it. Older configurations: the default.
    #[serde(default = "default_busy_poll_us")]
    pub busy_poll_us: u64,
    /// `--data-path` as given (`copy`, `user-copy`, `none`); `None`: the
    /// target's default.
    #[serde(default)]
    pub data_path: Option<String>,
    /// `--async`: the null device is served by the async null target.
    #[serde(default)]
    pub async_target: bool,
    /// The legs and chunk of a stripe device; absent for other targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe: Option<StripeConfig>,
    /// An NBD device's server and export; absent for other targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<NbdConfig>,
    /// The most bytes the daemon's target holds, above which `ublk resize`
    /// refuses: a ramdisk's memory, allocated at `ublk add`. `None` where
    /// the backing storage decides (loop, stripe: checked at resize) or
    /// there is no limit (null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
}

/// Where an NBD device's export is, as `ublk add -t nbd` was told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdConfig {
    /// TCP host (with `port`), or none for a unix socket.
    pub host: Option<String>,
    /// TCP port.
    pub port: u16,
    /// Unix socket, or none for TCP.
    pub unix: Option<PathBuf>,
    /// Export name (empty: the server's default).
    pub export: String,
    /// Connections (one per queue).
    pub connections: u16,
    /// `--recovery`: lost connections are made again.
    pub reconnect: bool,
    /// `--simple-replies`.
    pub simple_replies: bool,
}

impl NbdConfig {
    /// The server as `ublk list` shows it in the FILE column.
    pub fn server(&self) -> PathBuf {
        match (&self.host, &self.unix) {
            (_, Some(p)) => PathBuf::from(format!("nbd+unix:{}", p.display())),
            (Some(h), None) => PathBuf::from(format!("nbd:{h}:{}", self.port)),
            (None, None) => PathBuf::from("nbd:?"),
        }
    }
}

/// A stripe device's legs (absolute paths, in order) and chunk size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeConfig {
    /// The legs, leg 0 first.
    pub legs: Vec<PathBuf>,
    /// Bytes per chunk.
    pub chunk: u32,
}

impl StripeConfig {
    /// The legs as one comma-separated string (for `ublk list`).
    pub fn files(&self) -> PathBuf {
        let names: Vec<String> = self.legs.iter().map(|p| p.display().to_string()).collect();
        PathBuf::from(names.join(","))
    }
}

fn one() -> u16 {
    1
}

fn default_busy_poll_us() -> u64 {
    ublk::DEFAULT_BUSY_POLL.as_micros() as u64
}

impl DeviceConfig {
    /// `<run dir>/<id>.json`.
    pub fn path(id: u32) -> Result<PathBuf, String> {
        Ok(run_dir()?.join(format!("{id}.json")))
    }

    /// Reads `<run dir>/<id>.json`; `Ok(None)` if there is none. A file
    /// that is not the caller's (or root's), is writable by others, does
    /// not parse, or names another device is refused, with the reason.
    pub fn load(id: u32) -> Result<Option<DeviceConfig>, String> {
        Self::load_in(&run_dir()?, id)
    }

    /// [`load`](Self::load) from directory `dir`.
    pub fn load_in(dir: &Path, id: u32) -> Result<Option<DeviceConfig>, String> {
        if !dir.exists() {
            return Ok(None);
        }
        check_dir(dir)?;
        let p = dir.join(format!("{id}.json"));
        match Self::load_from(&p)? {
            Some(c) if c.id != id => Err(format!(
                "{} names device {}, not device {id}: refusing it (remove the file; `ublk list` shows the devices)",
                p.display(),
                c.id
            )),
            c => Ok(c),
        }
    }

    /// Reads one configuration file; `Ok(None)` if it does not exist. It
    /// must be a regular file (not a symlink) of the caller's or root's,
    /// writable by nobody else, and parse.
    pub fn load_from(p: &Path) -> Result<Option<DeviceConfig>, String> {
        let f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e} (a symlink is refused)", p.display())),
        };
        let m = f.metadata().map_err(|e| format!("reading {}: {e}", p.display()))?;
        let me = euid();
        if !m.is_file() {
            return Err(format!("{} is not a regular file: refusing it", p.display()));
        }
        if m.uid() != me && m.uid() != 0 {
            return Err(format!(
                "{} belongs to uid {}, not to the caller (uid {me}) or root: refusing to trust it (it names the daemon to signal and the backing file to open); remove it",
                p.display(),
                m.uid()
            ));
        }
        if m.mode() & 0o022 != 0 {
            return Err(format!("{} is writable by others (mode {:04o}): refusing to trust it; remove it", p.display(), m.mode() & 0o7777));
        }
        let mut s = String::new();
        (&f).read_to_string(&mut s).map_err(|e| format!("reading {}: {e}", p.display()))?;
        serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| format!("{} is not a valid device configuration: {e}; refusing it (remove the file)", p.display()))
    }

    /// Writes the configuration atomically (temporary file, then rename),
    /// readable by everyone and writable by the caller only.
    pub fn save(&self) -> Result<(), String> {
        let dir = ensure_run_dir()?;
        let p = dir.join(format!("{}.json", self.id));
        let tmp = dir.join(format!(".{}.json.{}", self.id, std::process::id()));
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(|e| format!("setting the mode of {}: {e}", tmp.display()))?;
        f.write_all(text.as_bytes()).and_then(|()| f.write_all(b"\n")).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, &p).map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), p.display()))
    }

    /// Removes `<run dir>/<id>.json` (no error if it is already gone, or if
    /// there is no run directory).
    pub fn remove(id: u32) {
        if let Ok(p) = Self::path(id) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Every persisted configuration that can be trusted (see [`load`](Self::load)), by id.
    pub fn all() -> Vec<DeviceConfig> {
        let Ok(dir) = run_dir() else { return vec![] };
        if check_dir(&dir).is_err() {
            return vec![];
        }
        let mut v: Vec<DeviceConfig> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let id: u32 = name.strip_suffix(".json")?.parse().ok()?;
                        Self::load(id).ok().flatten()
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|c| c.id);
        v
    }
}

/// Whether `pid` is a running process (not a zombie waiting to be reaped).
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(s) => s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

/// The start time of a process: field 22 of a `/proc/PID/stat` line, in
/// clock ticks since boot. The command name (field 2, in parentheses) may
/// hold spaces and parentheses, so fields are counted after the last ')'.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After the ')' come fields 3 (state), 4, ...: field 22 is the 20th.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The start time of process `pid` (see [`parse_start_time`]); `None` if
/// there is no such process.
pub fn process_start_time(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    parse_start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether the running process `pid` is the daemon `cfg` records (same pid
/// and same start time): `Ok(())` if so, else why it cannot be taken for it.
/// A process that merely reuses a dead daemon's pid is not the daemon.
pub fn verify_daemon(pid: u32, id: u32, cfg: Option<&DeviceConfig>) -> Result<(), String> {
    if !pid_alive(pid) {
        return Err(format!("pid {pid} is not running"));
    }
    let Some(cfg) = cfg else {
        let where_ = DeviceConfig::path(id).map(|p| p.display().to_string()).unwrap_or_else(|e| e);
        return Err(format!("no saved configuration ({where_}) records which process serves device {id}"));
    };
    if cfg.pid != pid {
        return Err(format!("the saved configuration names pid {} as the daemon of device {id}, not {pid}", cfg.pid));
    }
    let Some(want) = cfg.pid_start else {
        return Err(format!(
            "the saved configuration of device {id} (written by an older ublk) has no start time to tell its daemon from a process that reused pid {pid}"
        ));
    };
    match process_start_time(pid) {
        Some(t) if t == want => Ok(()),
        Some(t) => Err(format!(
            "pid {pid} is now another process (started at tick {t}; the daemon of device {id} started at tick {want}): the daemon died and its pid was reused"
        )),
        None => Err(format!("pid {pid} is not running")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_alive() {
        let dir = std::env::temp_dir().join(format!("ublk-cfg-test-{}", std::process::id()));
        std::env::set_var("UBLK_RUN_DIR", &dir);
        let c = DeviceConfig {
            id: 7,
            target: "loop".into(),
            file: Some("/tmp/x".into()),
            size: 1 << 20,
            block_size: 512,
            queues: 2,
            depth: 64,
            threads_per_queue: 2,
            flags: 8,
            flag_names: vec!["UBLK_F_USER_RECOVERY".into()],
            direct: false,
            pid: 1,
            pid_start: Some(42),
            placement: PlacementArg::Unpinned,
            busy_poll_us: 0,
            data_path: Some("user-copy".into()),
            async_target: false,
            stripe: None,
            nbd: None,
            capacity: None,
        };
        c.save().unwrap();
        assert_eq!(DeviceConfig::load(7).unwrap(), Some(c.clone()));
        assert_eq!(DeviceConfig::all(), vec![c]);
        DeviceConfig::remove(7);
        assert_eq!(DeviceConfig::load(7).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
    }

    #[test]
    fn start_time_is_field_22_after_the_command() {
        // A command name with spaces and parentheses, as a process may set.
        let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 3 4 0 0 20 0 1 0 987654 1000 200 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("4242 (x) S 1 2"), None, "a truncated line has no field 22");
        assert_eq!(parse_start_time("no parenthesis"), None);
        // Our own start time: present, stable, and matching what /proc says.
        let me = std::process::id();
        let t = process_start_time(me).expect("our own start time");
        assert_eq!(process_start_time(me), Some(t));
        // A child started later has a start time no earlier than ours.
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let tc = process_start_time(child.id()).expect("the child's start time");
        assert!(tc >= t, "child started at {tc}, before us ({t})");
        let cfg = |pid: u32, start: Option<u64>| DeviceConfig {
            id: 3,
            target: "null".into(),
            file: None,
            size: 1 << 20,
            block_size: 512,
            queues: 1,
            depth: 1,
            threads_per_queue: 1,
            flags: 0,
            flag_names: vec![],
            direct: false,
            pid,
            pid_start: start,
            placement: PlacementArg::Auto,
            busy_poll_us: 200,
            data_path: None,
            async_target: true,
            stripe: None,
            nbd: None,
            capacity: None,
        };
        assert_eq!(verify_daemon(child.id(), 3, Some(&cfg(child.id(), Some(tc)))), Ok(()));
        let e = verify_daemon(child.id(), 3, Some(&cfg(child.id(), Some(tc + 1)))).unwrap_err();
        assert!(e.contains("another process") && e.contains("reused"), "{e}");
        let e = verify_daemon(child.id(), 3, Some(&cfg(child.id(), None))).unwrap_err();
        assert!(e.contains("no start time"), "{e}");
        let e = verify_daemon(child.id(), 3, Some(&cfg(me, Some(t)))).unwrap_err();
        assert!(e.contains(&format!("names pid {me}")), "{e}");
        let e = verify_daemon(child.id(), 3, None).unwrap_err();
        assert!(e.contains("no saved configuration"), "{e}");
        child.kill().unwrap();
        child.wait().unwrap();
        let e = verify_daemon(child.id(), 3, Some(&cfg(child.id(), Some(tc)))).unwrap_err();
        assert!(e.contains("not running"), "{e}");
    }

    #[test]
    fn run_dir_per_user() {
        assert_eq!(run_dir_for(0, None, Some("/run/user/0".into())), Ok(PathBuf::from("/run/ublk")));
        assert_eq!(run_dir_for(1000, None, Some("/run/user/1000".into())), Ok(PathBuf::from("/run/user/1000/ublk")));
        assert_eq!(run_dir_for(1000, Some("/x".into()), None), Ok(PathBuf::from("/x")));
        let e = run_dir_for(1000, None, None).unwrap_err();
        assert!(e.contains("XDG_RUNTIME_DIR is not set") && e.contains("UBLK_RUN_DIR"), "{e}");
        let e = run_dir_for(1000, None, Some("rel".into())).unwrap_err();
        assert!(e.contains("not an absolute path"), "{e}");
    }

    /// A file that does not parse, names another device, is writable by
    /// others, or is a symlink is refused, never trusted; so is a directory
    /// writable by others.
    #[test]
    fn untrustworthy_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("ublk-cfg-trust-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let good = r#"{"id": 4, "target": "null", "file": null, "size": 1048576, "block_size": 512,
            "queues": 1, "depth": 128, "flags": 0, "flag_names": [], "direct": false, "pid": 77}"#;
        write("4.json", good, 0o644);
        assert_eq!(DeviceConfig::load_in(&dir, 4).unwrap().unwrap().id, 4);
        assert_eq!(DeviceConfig::load_in(&dir, 9).unwrap(), None, "no file: no configuration");
        write("5.json", good, 0o644);
        let e = DeviceConfig::load_in(&dir, 5).unwrap_err();
        assert!(e.contains("names device 4, not device 5"), "{e}");
        write("6.json", "{ not json", 0o644);
        let e = DeviceConfig::load_in(&dir, 6).unwrap_err();
        assert!(e.contains("not a valid device configuration"), "{e}");
        write("7.json", &good.replace("\"id\": 4", "\"id\": 7"), 0o666);
        let e = DeviceConfig::load_in(&dir, 7).unwrap_err();
        assert!(e.contains("writable by others"), "{e}");
        std::os::unix::fs::symlink(dir.join("4.json"), dir.join("8.json")).unwrap();
        let e = DeviceConfig::load_in(&dir, 8).unwrap_err();
        assert!(e.contains("symlink"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = DeviceConfig::load_in(&dir, 4).unwrap_err();
        assert!(e.contains("writable by others"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn older_configurations_load_with_defaults() {
        // A configuration as `ublk add` wrote it before start times,
        // placement and busy polling were kept.
        let old = r#"{"id": 2, "target": "loop", "file": "/tmp/x", "size": 1048576, "block_size": 512,
            "queues": 1, "depth": 128, "flags": 8, "flag_names": ["UBLK_F_USER_RECOVERY"], "direct": false, "pid": 77}"#;
        let c: DeviceConfig = serde_json::from_str(old).unwrap();
        assert_eq!(c.pid, 77);
        assert_eq!(c.pid_start, None);
        assert_eq!(c.placement, PlacementArg::Auto);
        assert_eq!(c.busy_poll_us, ublk::DEFAULT_BUSY_POLL.as_micros() as u64);
        // And the new fields round-trip by name.
        let mut n = c.clone();
        n.placement = PlacementArg::Affinity;
        n.busy_poll_us = 0;
        n.pid_start = Some(5);
        let text = serde_json::to_string(&n).unwrap();
        assert!(text.contains(r#""placement":"affinity""#) && text.contains(r#""busy_poll_us":0"#), "{text}");
        assert_eq!(serde_json::from_str::<DeviceConfig>(&text).unwrap(), n);
        // A stripe's legs: absent before stripes (and for other targets),
        // kept by name when present.
        assert_eq!(c.stripe, None);
        assert!(!text.contains("stripe"), "{text}");
        n.target = "stripe".into();
        n.stripe = Some(StripeConfig { legs: vec!["/a".into(), "/b".into()], chunk: 16384 });
        let text = serde_json::to_string(&n).unwrap();
        assert!(text.contains(r#""stripe":{"legs":["/a","/b"],"chunk":16384}"#), "{text}");
        assert_eq!(serde_json::from_str::<DeviceConfig>(&text).unwrap(), n);
    }
}
