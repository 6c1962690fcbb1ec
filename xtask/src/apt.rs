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

/// The Debian archive the private tree fetches from: the mirror's base URL
/// (the part before `/debian`, e.g. `http://deb.debian.org`) and the keyring
/// that signs it, when the source names one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mirror {
    base: String,
    keyring: Option<String>,
}

/// Where the host's apt reads its sources from, in apt's order: `sources.list`,
/// then `sources.list.d/*.list` and `*.sources` by name (apt ignores other names).
fn source_files(etc_apt: &Path) -> Vec<PathBuf> {
    let mut files = vec![etc_apt.join("sources.list")];
    if let Ok(rd) = std::fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut v: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources") && p.is_file())
            .collect();
        v.sort();
        files.extend(v);
    }
    files
}

/// The base of a Debian archive URI (`http://host/debian/` -> `http://host`),
/// or None for another archive (debian-security, Ubuntu, third parties, snapshots).
fn debian_base(uri: &str) -> Option<String> {
    if !(uri.starts_with("http://") || uri.starts_with("https://")) {
        return None;
    }
    uri.trim_end_matches('/').strip_suffix("/debian").filter(|b| b.contains("://") && !b.ends_with('/')).map(str::to_string)
}

/// The first keyring path of a `Signed-By`/`signed-by=` value (paths may be
/// separated by commas or spaces; fingerprints and inline keys are skipped).
fn keyring_path(v: &str) -> Option<String> {
    v.split([',', ' ', '\t']).map(str::trim).find(|k| k.starts_with('/')).map(str::to_string)
}

/// Debian mirrors (`deb` entries for `<base>/debian`) in a one-line-format
/// file (`sources.list`, `*.list`).
fn mirrors_one_line(text: &str) -> Vec<Mirror> {
    let mut v = Vec::new();
    for line in text.lines() {
        let l = line.split('#').next().unwrap_or("").trim();
        let Some(mut rest) = l.strip_prefix("deb ").or_else(|| l.strip_prefix("deb\t")).map(str::trim_start) else {
            continue;
        };
        let mut keyring = None;
        if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else {
                continue;
            };
            for o in r[..end].split_whitespace() {
                if let Some(k) = o.strip_prefix("signed-by=") {
                    keyring = keyring_path(k);
                }
            }
            rest = &r[end + 1..];
        }
        if let Some(base) = rest.split_whitespace().next().and_then(debian_base) {
            v.push(Mirror { base, keyring });
        }
    }
    v
}

/// Debian mirrors in a deb822 file (`*.sources`): stanzas with `Types: deb`,
/// not `Enabled: no`, and a `URIs:` entry for `<base>/debian`.
fn mirrors_deb822(text: &str) -> Vec<Mirror> {
    let mut v = Vec::new();
    let mut stanza: Vec<(String, String)> = Vec::new();
    let mut flush = |stanza: &mut Vec<(String, String)>| {
        let field = |name: &str| stanza.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
        let enabled = field("Enabled").is_none_or(|e| !e.trim().eq_ignore_ascii_case("no"));
        let deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        if enabled && deb {
            let keyring = field("Signed-By").and_then(|k| k.lines().next()).and_then(keyring_path);
            for base in field("URIs").unwrap_or("").split_whitespace().filter_map(debian_base) {
                v.push(Mirror { base, keyring: keyring.clone() });
            }
        }
        stanza.clear();
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            flush(&mut stanza);
        } else if line.starts_with('#') {
            // a comment line, also inside a stanza
        } else if line.starts_with([' ', '\t']) {
            // continuation of the previous field (e.g. an inline key)
            if let Some((_, v)) = stanza.last_mut() {
                v.push('\n');
                v.push_str(line.trim());
            }
        } else if let Some((k, val)) = line.split_once(':') {
            stanza.push((k.trim().to_string(), val.trim().to_string()));
        }
    }
    flush(&mut stanza);
    v
}

/// The first Debian mirror among the host's sources files (path, contents or
/// None when unreadable), or an error naming the files read and the fix.
fn find_mirror(files: &[(PathBuf, Option<String>)]) -> Result<Mirror> {
    for (path, text) in files {
        let Some(text) = text else {
            continue;
        };
        let found = if path.extension().is_some_and(|e| e == "sources") { mirrors_deb822(text) } else { mirrors_one_line(text) };
        if let Some(m) = found.into_iter().next() {
            return Ok(m);
        }
    }
    let read: Vec<String> = files.iter().map(|(p, t)| format!("{}{}", p.display(), if t.is_some() { "" } else { " (absent)" })).collect();
    bail!(
        "no Debian mirror in the host's apt sources (read {}): the private apt tree fetches kernels and headers from the mirror the host uses, \
         and none of these has a `deb` entry for <mirror>/debian; set {MIRROR_ENV} to a Debian mirror's base URL (the part before /debian, \
         e.g. {MIRROR_ENV}=http://deb.debian.org), or configure a Debian source in the host's apt",
        read.join(", ")
    )
}

/// Overrides the host's apt sources: a Debian mirror's base URL.
const MIRROR_ENV: &str = "UBLK_DEBIAN_MIRROR";

/// The Debian keyring package's file, for a mirror whose source names none.
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The Debian mirror and keyring the host's apt uses (or `UBLK_DEBIAN_MIRROR`),
/// so the private tree goes the same way.
fn host_mirror() -> Result<(String, String)> {
    let files: Vec<(PathBuf, Option<String>)> =
        source_files(Path::new("/etc/apt")).into_iter().map(|p| (p.clone(), std::fs::read_to_string(&p).ok())).collect();
    let from_host = find_mirror(&files);
    let (base, keyring) = match std::env::var(MIRROR_ENV) {
        Ok(url) if !url.trim().is_empty() => {
            let url = url.trim().trim_end_matches('/');
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.ends_with("/debian") {
                bail!("{MIRROR_ENV}={url} is not a mirror's base URL: give http(s)://HOST[/PATH] without the trailing /debian");
            }
            (url.to_string(), from_host.ok().and_then(|m| m.keyring))
        }
        _ => {
            let m = from_host?;
            (m.base, m.keyring)
        }
    };
    let keyring = keyring.unwrap_or_else(|| DEBIAN_KEYRING.to_string());
    if !Path::new(&keyring).is_file() {
        bail!("the Debian archive keyring {keyring} is missing: install the debian-archive-keyring package");
    }
    Ok((base, keyring))
}

/// The private tree, set up from the host's mirror on first use.
pub fn get() -> Result<&'static Apt> {
    if let Some(a) = APT.get() {
        return Ok(a);
    }
    let (base, keyring) = host_mirror()?;
    let dir = util::cache_dir().join("apt");
    Ok(APT.get_or_init(|| Apt { debs: util::cache_dir().join("debs"), dir, base, keyring }))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn m(base: &str, keyring: Option<&str>) -> Mirror {
        Mirror { base: base.into(), keyring: keyring.map(str::to_string) }
    }

    #[test]
    fn one_line_sources() {
        let text = "\
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb http://security.example/debian-security bookworm-security main
deb [arch=amd64 signed-by=/usr/share/keyrings/a.gpg] http://mirror.example/debian/ bookworm main
deb\thttps://second.example/pub/debian trixie main # trailing comment
deb http://archive.ubuntu.com/ubuntu noble main
";
        assert_eq!(
            mirrors_one_line(text),
            vec![m("http://mirror.example", Some("/usr/share/keyrings/a.gpg")), m("https://second.example/pub", None)]
        );
        assert_eq!(mirrors_one_line("deb cdrom:[Debian]/ bookworm main\ndeb file:/srv/debian bookworm main\n"), vec![]);
    }

    #[test]
    fn deb822_sources() {
        let text = "\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src-only.example/debian
Suites: bookworm

Types: deb
Enabled: no
URIs: http://disabled.example/debian
Suites: bookworm

types: deb deb-src
uris: https://inline.example/debian
suites: trixie
signed-by:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mDMEZ...
 -----END PGP PUBLIC KEY BLOCK-----
";
        assert_eq!(
            mirrors_deb822(text),
            vec![m("http://mirror.example", Some("/usr/share/keyrings/debian-archive-keyring.gpg")), m("https://inline.example", None)]
        );
    }

    #[test]
    fn first_mirror_by_file_format() {
        let files = vec![
            (PathBuf::from("/etc/apt/sources.list"), None),
            // deb822 text in a .list file is not read as deb822 (apt would not either)
            (PathBuf::from("/etc/apt/sources.list.d/a.list"), Some("Types: deb\nURIs: http://wrong.example/debian\n".to_string())),
            (PathBuf::from("/etc/apt/sources.list.d/debian.sources"), Some("Types: deb\nURIs: http://right.example/debian\n".to_string())),
        ];
        assert_eq!(find_mirror(&files).unwrap(), m("http://right.example", None));
    }

    #[test]
    fn no_mirror_is_an_error_naming_the_files_and_the_fix() {
        let files = vec![
            (PathBuf::from("/etc/apt/sources.list"), None),
            (
                PathBuf::from("/etc/apt/sources.list.d/ubuntu.sources"),
                Some("Types: deb\nURIs: http://archive.ubuntu.com/ubuntu\n".to_string()),
            ),
            (
                PathBuf::from("/etc/apt/sources.list.d/node.list"),
                Some("deb https://deb.nodesource.com/node_20.x nodistro main\n".to_string()),
            ),
        ];
        let e = find_mirror(&files).unwrap_err().to_string();
        for want in [
            "no Debian mirror",
            "/etc/apt/sources.list (absent)",
            "/etc/apt/sources.list.d/ubuntu.sources",
            "/etc/apt/sources.list.d/node.list",
            "UBLK_DEBIAN_MIRROR=",
        ] {
            assert!(e.contains(want), "{want:?} missing from: {e}");
        }
    }

    #[test]
    fn source_files_are_apt_s() {
        let dir = std::env::temp_dir().join(format!("xtask-apt-test-{}", std::process::id()));
        let d = dir.join("sources.list.d");
        std::fs::create_dir_all(&d).unwrap();
        for f in ["b.sources", "a.list", "c.list.disabled-by-farm", "d.save"] {
            std::fs::write(d.join(f), "").unwrap();
        }
        let got = source_files(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(got, vec![dir.join("sources.list"), d.join("a.list"), d.join("b.sources")]);
    }
}
