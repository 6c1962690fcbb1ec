//! A private apt tree (own sources.list, lists, cache, empty dpkg status)
//! under the cache dir, used to resolve and fetch packages from any Debian
//! suite without touching the host's /etc/apt.

use crate::util::{self, deb_cmp, output};
use crate::{log, warn};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Suites that the private tree knows about.
const SUITES: &[(&str, &str)] = &[
    ("debian", "bookworm"),
    ("debian-security", "bookworm-security"),
    ("debian", "trixie"),
    ("debian", "trixie-backports"),
    ("debian", "sid"),
    ("debian", "experimental"),
];

pub struct Apt {
    dir: PathBuf,
    pub debs: PathBuf,
    base: String,
    keyring: String,
}

static UPDATED: OnceLock<bool> = OnceLock::new();
static APT: OnceLock<Apt> = OnceLock::new();

/// Find the Debian mirror base URL (e.g. `http://deb.debian.org`) and keyring the
/// host's apt uses, so the private tree goes the same way.
fn host_mirror() -> (String, String) {
    let mut base = None;
    let mut keyring = None;
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut v: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        v.sort();
        files.extend(v);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        // deb822 stanzas
        for stanza in text.split("\n\n") {
            let mut uri = None;
            let mut key = None;
            let mut is_debian = false;
            for line in stanza.lines() {
                let l = line.trim();
                if let Some(v) = l.strip_prefix("URIs:") {
                    uri = v.split_whitespace().next().map(str::to_string);
                } else if let Some(v) = l.strip_prefix("Signed-By:") {
                    key = Some(v.trim().to_string());
                } else if let Some(v) = l.strip_prefix("Suites:") {
                    is_debian = v.split_whitespace().any(|s| s == "bookworm");
                }
            }
            if let (Some(u), true) = (uri, is_debian) {
                if let Some(b) = u.trim_end_matches('/').strip_suffix("/debian") {
                    base.get_or_insert(b.to_string());
                    if let Some(k) = key {
                        keyring.get_or_insert(k);
                    }
                }
            }
        }
        // one-line format
        for line in text.lines() {
            let l = line.trim();
            if !l.starts_with("deb ") {
                continue;
            }
            let mut opts_key = None;
            let mut rest = &l[4..];
            if rest.trim_start().starts_with('[') {
                let r = rest.trim_start();
                if let Some(end) = r.find(']') {
                    for o in r[1..end].split_whitespace() {
                        if let Some(k) = o.strip_prefix("signed-by=") {
                            opts_key = Some(k.to_string());
                        }
                    }
                    rest = &r[end + 1..];
                }
            }
            let mut it = rest.split_whitespace();
            let (Some(u), Some(s)) = (it.next(), it.next()) else {
                continue;
            };
            if s == "bookworm" {
                if let Some(b) = u.trim_end_matches('/').strip_suffix("/debian") {
                    base.get_or_insert(b.to_string());
                    if let Some(k) = opts_key {
                        keyring.get_or_insert(k);
                    }
                }
            }
        }
    }
    (
        base.unwrap_or_else(|| "http://deb.debian.org".to_string()),
        keyring.unwrap_or_else(|| "/usr/share/keyrings/debian-archive-keyring.gpg".to_string()),
    )
}

pub fn get() -> &'static Apt {
    APT.get_or_init(|| {
        let (base, keyring) = host_mirror();
        let dir = util::cache_dir().join("apt");
        Apt { debs: util::cache_dir().join("debs"), dir, base, keyring }
    })
}

#[derive(Debug, Clone)]
pub struct Cand {
    pub pkg: String,
    pub version: String,
    pub suite: String,
}

impl Apt {
    fn setup(&self) -> Result<()> {
        for d in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(self.dir.join(d))?;
        }
        std::fs::create_dir_all(&self.debs)?;
        let status = self.dir.join("status");
        if !status.exists() {
            std::fs::write(&status, "")?;
        }
        let mut sl = String::new();
        for (archive, suite) in SUITES {
            sl.push_str(&format!("deb [signed-by={}] {}/{} {} main\n", self.keyring, self.base, archive, suite));
            if suite.starts_with("bookworm") {
                sl.push_str(&format!("deb-src [signed-by={}] {}/{} {} main\n", self.keyring, self.base, archive, suite));
            }
        }
        let path = self.dir.join("sources.list");
        if std::fs::read_to_string(&path).ok().as_deref() != Some(sl.as_str()) {
            std::fs::write(&path, sl)?;
        }
        Ok(())
    }

    fn opts(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("-oDir::Etc::SourceList={d}/sources.list"),
            "-oDir::Etc::SourceParts=/dev/null".into(),
            format!("-oDir::State::Lists={d}/lists"),
            format!("-oDir::Cache={d}/cache"),
            format!("-oDir::State::Status={d}/status"),
            "-oAPT::Architecture=amd64".into(),
            "-oAPT::Architectures::=amd64".into(),
            "-oAPT::Sandbox::User=root".into(),
            "-oAcquire::Languages=none".into(),
            "-oAcquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "-oAcquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "-oAcquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
            "-oAcquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false".into(),
            "-oAcquire::Retries=1".into(),
            "-oAcquire::http::Timeout=30".into(),
            "-oDebug::NoLocking=1".into(),
            // the host may disable apt's binary caches (docker-clean); re-enable
            // them for the private tree so each apt-cache call is fast
            "-oDir::Cache::pkgcache=pkgcache.bin".into(),
            "-oDir::Cache::srcpkgcache=srcpkgcache.bin".into(),
        ]
    }

    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.args(self.opts());
        c
    }

    /// `apt-get update` of the private tree, at most once per xtask run.
    /// Returns whether the archive was reachable. `UBLK_OFFLINE=1` skips it.
    pub fn update(&self) -> bool {
        *UPDATED.get_or_init(|| {
            if let Err(e) = self.setup() {
                warn!("cannot set up private apt tree: {e:#}");
                return false;
            }
            if std::env::var("UBLK_OFFLINE").map(|v| v == "1").unwrap_or(false) {
                warn!("UBLK_OFFLINE=1: not refreshing package lists, using cached versions");
                return false;
            }
            log!("refreshing private apt tree {} (mirror {})", self.dir.display(), self.base);
            let mut c = self.cmd("apt-get");
            c.arg("-q").arg("update");
            match output(&mut c) {
                Ok(out) => {
                    // apt-get update exits 0 even if some index failed; look for "Err:"/"W:".
                    if out.lines().any(|l| l.starts_with("Err:")) {
                        warn!("some package indexes could not be fetched; using what is cached");
                        false
                    } else {
                        true
                    }
                }
                Err(e) => {
                    warn!("package archive unreachable ({}); falling back to cached versions", first_line(&e.to_string()));
                    false
                }
            }
        })
    }

    /// Package names matching an apt regex (names only).
    pub fn search(&self, regex: &str) -> Result<Vec<String>> {
        let mut c = self.cmd("apt-cache");
        c.args(["search", "--names-only", regex]);
        let out = output(&mut c)?;
        Ok(out.lines().filter_map(|l| l.split(" - ").next()).map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
    }

    /// All (package, version, suite) available for these binary packages, newest first.
    pub fn candidates(&self, pkgs: &[String]) -> Result<Vec<Cand>> {
        if pkgs.is_empty() {
            return Ok(vec![]);
        }
        let mut c = self.cmd("apt-cache");
        c.arg("madison").args(pkgs);
        let out = output(&mut c)?;
        let mut v = Vec::new();
        for l in out.lines() {
            let f: Vec<&str> = l.split('|').map(str::trim).collect();
            if f.len() < 3 || !f[2].ends_with("Packages") {
                continue;
            }
            let suite = f[2].split_whitespace().nth(1).and_then(|s| s.split('/').next()).unwrap_or("?").to_string();
            v.push(Cand { pkg: f[0].to_string(), version: f[1].to_string(), suite });
        }
        v.sort_by(|a, b| deb_cmp(&b.version, &a.version));
        Ok(v)
    }

    /// Source versions of a source package, newest first.
    pub fn source_versions(&self, src: &str) -> Result<Vec<(String, String)>> {
        let mut c = self.cmd("apt-cache");
        c.args(["madison", src]);
        let out = output(&mut c)?;
        let mut v = Vec::new();
        for l in out.lines() {
            let f: Vec<&str> = l.split('|').map(str::trim).collect();
            if f.len() >= 3 && f[0] == src && f[2].ends_with("Sources") {
                let suite = f[2].split_whitespace().nth(1).and_then(|s| s.split('/').next()).unwrap_or("?").to_string();
                v.push((f[1].to_string(), suite));
            }
        }
        v.sort_by(|a, b| deb_cmp(&b.0, &a.0));
        v.dedup();
        Ok(v)
    }

    /// URI lines of `--print-uris`: (url, filename, size, checksum).
    fn print_uris(&self, args: &[&str]) -> Result<Vec<(String, String, String)>> {
        let mut c = self.cmd("apt-get");
        c.args(args).arg("--print-uris");
        // apt-get download prints nothing for files present in the cwd: use an empty dir.
        let empty = self.dir.join("empty");
        std::fs::create_dir_all(&empty)?;
        c.current_dir(&empty);
        let out = output(&mut c)?;
        Ok(out
            .lines()
            .filter(|l| l.starts_with('\''))
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let url = it.next()?.trim_matches('\'').to_string();
                let file = it.next()?.to_string();
                let _size = it.next();
                let sum = it.next().unwrap_or("").to_string();
                Some((url, file, sum))
            })
            .collect())
    }

    /// Download one .deb (pkg=version) into the cache unless it is there already.
    pub fn download(&self, pkg: &str, version: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.debs)?;
        let spec = format!("{pkg}={version}");
        let uris = self.print_uris(&["download", &spec])?;
        let Some((url, file, _)) = uris.into_iter().next() else {
            bail!("apt-get download --print-uris {spec} gave no URI");
        };
        let path = self.debs.join(&file);
        if path.exists() {
            log!("cached: {}", path.display());
            return Ok(path);
        }
        log!("downloading {url}");
        let mut c = self.cmd("apt-get");
        c.args(["-q", "download", &spec]).current_dir(&self.debs);
        output(&mut c).with_context(|| format!("downloading {spec}"))?;
        if !path.exists() {
            bail!("apt-get download {spec} did not produce {}", path.display());
        }
        Ok(path)
    }

    /// The orig tarball of a source package version: (url, filename, "SHA256:..").
    pub fn orig_tarball(&self, src: &str, version: &str) -> Result<(String, String, String)> {
        let spec = format!("{src}={version}");
        let uris = self.print_uris(&["source", "--download-only", &spec])?;
        uris.into_iter().find(|(_, f, _)| f.contains(".orig.tar.")).ok_or_else(|| anyhow::anyhow!("no orig tarball for {spec}"))
    }
}

/// Extract a .deb into `dest` (once per .deb; a marker file records completion).
pub fn extract(deb: &Path, dest: &Path) -> Result<()> {
    let name = deb.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let marker = dest.join(format!(".xtask-extracted-{name}"));
    if marker.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dest)?;
    log!("extracting {} -> {}", deb.display(), dest.display());
    output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest))?;
    std::fs::write(marker, deb.display().to_string())?;
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}
