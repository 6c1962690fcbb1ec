//! The configuration `ublk add` persists for each live device, as JSON at
//! `/run/ublk/<id>.json` (`$UBLK_RUN_DIR/<id>.json` when that is set): what
//! `ublk list` shows and what `ublk recover` serves again.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Directory of the persisted configurations and daemon logs.
pub fn run_dir() -> PathBuf {
    std::env::var_os("UBLK_RUN_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/run/ublk"))
}

/// A device's persisted configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// Device id (N of /dev/ublkbN).
    pub id: u32,
    /// `null`, `ramdisk` or `loop`.
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
    /// `UBLK_F_*` flags the device has (as ADD_DEV returned them).
    pub flags: u64,
    /// Those flags by name.
    pub flag_names: Vec<String>,
    /// Backing file opened with O_DIRECT.
    pub direct: bool,
    /// Pid of the serving daemon.
    pub pid: u32,
}

impl DeviceConfig {
    /// `<run dir>/<id>.json`.
    pub fn path(id: u32) -> PathBuf {
        run_dir().join(format!("{id}.json"))
    }

    /// Reads `<run dir>/<id>.json`; `Ok(None)` if there is none.
    pub fn load(id: u32) -> Result<Option<DeviceConfig>, String> {
        Self::load_from(&Self::path(id))
    }

    /// Reads one configuration file; `Ok(None)` if it does not exist.
    pub fn load_from(p: &Path) -> Result<Option<DeviceConfig>, String> {
        match std::fs::read_to_string(p) {
            Ok(s) => serde_json::from_str(&s).map(Some).map_err(|e| format!("{} is not a valid device configuration: {e}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", p.display())),
        }
    }

    /// Writes the configuration atomically (temporary file, then rename).
    pub fn save(&self) -> Result<(), String> {
        let dir = run_dir();
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let p = Self::path(self.id);
        let tmp = dir.join(format!(".{}.json.{}", self.id, std::process::id()));
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        f.write_all(text.as_bytes()).and_then(|()| f.write_all(b"\n")).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, &p).map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), p.display()))
    }

    /// Removes `<run dir>/<id>.json` (no error if it is already gone).
    pub fn remove(id: u32) {
        let _ = std::fs::remove_file(Self::path(id));
    }

    /// Every persisted configuration, by id.
    pub fn all() -> Vec<DeviceConfig> {
        let mut v: Vec<DeviceConfig> = std::fs::read_dir(run_dir())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json") && !e.file_name().to_string_lossy().starts_with('.'))
                    .filter_map(|e| Self::load_from(&e.path()).ok().flatten())
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
            flags: 8,
            flag_names: vec!["UBLK_F_USER_RECOVERY".into()],
            direct: false,
            pid: 1,
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
}
