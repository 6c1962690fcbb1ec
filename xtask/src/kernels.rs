//! Kernels for the VM tests: 6.1 (built from Debian's bookworm orig tarball
//! with a tiny config), 6.12 (trixie cloud image, modules) and the newest 7.x
//! Debian ships in sid / experimental / trixie-backports.

use crate::apt::{self, Cand};
use crate::util::{self, cache_dir, output, sha256_file, sha256_hex};
use crate::{log, warn};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone)]
pub struct Kernel {
    /// "6.1", "6.12", "newest"
    pub name: String,
    /// Exact version (package version, or upstream version for 6.1).
    pub version: String,
    /// Where it came from (suite, or "built from linux_X.orig.tar.xz").
    pub origin: String,
    pub vmlinuz: PathBuf,
    /// Module tree (`.../lib/modules/<release>`), None when all is built in.
    pub modules: Option<PathBuf>,
    pub fresh: bool,
}

pub const ALL: &[&str] = &["6.1", "6.12", "newest"];

pub fn expand(sel: &str) -> Result<Vec<String>> {
    match sel {
        "all" => Ok(ALL.iter().map(|s| s.to_string()).collect()),
        s if ALL.contains(&s) => Ok(vec![s.to_string()]),
        "7" | "7.x" | "sid" | "latest" => Ok(vec!["newest".into()]),
        s => {
            let v: Vec<String> = s.split(',').map(|x| x.trim().to_string()).collect();
            if v.len() > 1 {
                let mut out = vec![];
                for x in v {
                    out.extend(expand(&x)?);
                }
                return Ok(out);
            }
            bail!("unknown kernel {s:?} (expected 6.1, 6.12, newest or all)")
        }
    }
}

pub fn get(name: &str) -> Result<Kernel> {
    let k = match name {
        "6.1" => kernel_6_1(),
        "6.12" => kernel_deb("6.12"),
        "newest" => kernel_deb("newest"),
        _ => bail!("unknown kernel {name}"),
    };
    match k {
        Ok(k) => {
            save_record(&k);
            Ok(k)
        }
        Err(e) => {
            if let Some(k) = load_record(name) {
                warn!("could not resolve kernel {name}: {e:#}");
                warn!("falling back to cached kernel {name} {} ({})", k.version, k.vmlinuz.display());
                Ok(k)
            } else {
                Err(e)
            }
        }
    }
}

fn record_path(name: &str) -> PathBuf {
    cache_dir().join("kernels").join(format!("{name}.last"))
}

fn save_record(k: &Kernel) {
    let text = format!(
        "version={}\norigin={}\nvmlinuz={}\nmodules={}\n",
        k.version,
        k.origin,
        k.vmlinuz.display(),
        k.modules.as_ref().map(|m| m.display().to_string()).unwrap_or_default()
    );
    let _ = std::fs::create_dir_all(cache_dir().join("kernels"));
    let _ = std::fs::write(record_path(&k.name), text);
}

fn load_record(name: &str) -> Option<Kernel> {
    let text = std::fs::read_to_string(record_path(name)).ok()?;
    let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).map(str::to_string);
    let vmlinuz = PathBuf::from(get("vmlinuz")?);
    if !vmlinuz.exists() {
        return None;
    }
    let modules = get("modules").filter(|m| !m.is_empty()).map(PathBuf::from);
    Some(Kernel {
        name: name.to_string(),
        version: get("version")?,
        origin: format!("{} (cached fallback)", get("origin").unwrap_or_default()),
        vmlinuz,
        modules,
        fresh: false,
    })
}

// ---------------------------------------------------------------- Debian images

fn kernel_deb(name: &str) -> Result<Kernel> {
    let apt = apt::get()?;
    apt.update();
    let (img, modpkg): (Cand, Option<String>) = if name == "6.12" {
        let names = apt.search(r"^linux-image-6\.12\..*-cloud-amd64-unsigned$")?;
        let c = apt
            .candidates(&names)?
            .into_iter()
            .find(|c| c.suite == "trixie")
            .context("no linux-image-6.12.*-cloud-amd64-unsigned in trixie")?;
        (c, None)
    } else {
        // Newest across sid / experimental / trixie-backports: split packages
        // (linux-binary-unsigned-ABI + linux-modules-ABI), or a classic image.
        let mut names = apt.search(r"^linux-binary-unsigned-.*-cloud-amd64$")?;
        names.extend(apt.search(r"^linux-image-[0-9].*-cloud-amd64-unsigned$")?);
        let cands: Vec<Cand> = apt
            .candidates(&names)?
            .into_iter()
            .filter(|c| ["sid", "unstable", "experimental", "trixie-backports"].contains(&c.suite.as_str()))
            .collect();
        let c = cands.first().cloned().context("no kernel image in sid/experimental/trixie-backports")?;
        log!(
            "newest kernel: {} {} from {} (considered {} candidates across sid/experimental/trixie-backports)",
            c.pkg,
            c.version,
            c.suite,
            cands.len()
        );
        let m = c.pkg.strip_prefix("linux-binary-unsigned-").map(|abi| format!("linux-modules-{abi}"));
        (c, m)
    };
    let abi =
        img.pkg.trim_start_matches("linux-binary-unsigned-").trim_start_matches("linux-image-").trim_end_matches("-unsigned").to_string();
    let root = cache_dir().join("kernels").join("deb").join(format!("{abi}_{}", img.version.replace(['~', ':'], "_")));
    let ready = root.join(".xtask-ready");
    let fresh = !ready.exists();
    if fresh {
        let deb = apt.download(&img.pkg, &img.version)?;
        apt::extract(&deb, &root)?;
        if let Some(m) = &modpkg {
            let deb = apt.download(m, &img.version)?;
            apt::extract(&deb, &root)?;
        }
    }
    let moddir = ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|d| root.join(d).join(&abi))
        .find(|p| p.join("kernel").is_dir())
        .with_context(|| format!("no module tree for {abi} in {}", root.display()))?;
    let vmlinuz = [root.join("boot").join(format!("vmlinuz-{abi}")), moddir.join("vmlinuz.unsigned"), moddir.join("vmlinuz")]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("no vmlinuz for {abi} in {}", root.display()))?;
    if fresh {
        depmod(&root, &moddir, &abi)?;
        std::fs::write(&ready, "")?;
    }
    Ok(Kernel {
        name: name.to_string(),
        version: format!("{} ({abi})", img.version),
        origin: format!("{} {}", img.pkg, img.suite),
        vmlinuz,
        modules: Some(moddir),
        fresh,
    })
}

/// The debs carry no modules.dep (depmod runs at install time): generate it.
fn depmod(root: &Path, moddir: &Path, abi: &str) -> Result<()> {
    if moddir.join("modules.dep").exists() {
        return Ok(());
    }
    // depmod -b BASE looks in BASE/lib/modules/<abi>.
    let base = if moddir.starts_with(root.join("usr/lib/modules")) {
        let lib = root.join("lib");
        if !lib.exists() {
            std::os::unix::fs::symlink("usr/lib", &lib)?;
        }
        root.to_path_buf()
    } else {
        root.to_path_buf()
    };
    log!("depmod for {abi}");
    output(Command::new(util::which("depmod").unwrap_or_else(|| "/sbin/depmod".into())).arg("-b").arg(&base).arg(abi))?;
    if !moddir.join("modules.dep").exists() {
        bail!("depmod did not create {}/modules.dep", moddir.display());
    }
    Ok(())
}

// ---------------------------------------------------------------- 6.1 from source

pub fn fragment_path() -> PathBuf {
    util::workspace_root().join("kernel").join("6.1.fragment")
}

/// Normalized CONFIG_ lines of the fragment.
fn fragment_lines() -> Result<Vec<String>> {
    let p = fragment_path();
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect())
}

/// Find (and download if needed) the newest 6.1 orig tarball: (upstream version, path).
fn source_6_1() -> Result<(String, PathBuf)> {
    let apt = apt::get()?;
    let online = apt.update();
    let srcdir = cache_dir().join("src");
    std::fs::create_dir_all(&srcdir)?;
    let mut tried = std::collections::BTreeSet::new();
    let versions = apt.source_versions("linux").unwrap_or_default();
    for (ver, suite) in versions.iter().filter(|(v, _)| v.starts_with("6.1.")) {
        let Ok((url, file, sum)) = apt.orig_tarball("linux", ver) else {
            continue;
        };
        if !tried.insert(file.clone()) {
            continue;
        }
        let upver = file.trim_start_matches("linux_").split(".orig.tar").next().unwrap_or_default().to_string();
        let path = srcdir.join(&file);
        if path.exists() {
            log!("6.1 source: {} (cached, {suite})", path.display());
            return Ok((upver, path));
        }
        if !online {
            continue;
        }
        // Remember 404s for a day so every run does not retry them.
        let neg = srcdir.join(format!("{file}.unavailable"));
        let recent = std::fs::metadata(&neg)
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().map(|e| e.as_secs() < 86400).unwrap_or(false))
            .unwrap_or(false);
        if recent {
            log!("skipping {file} ({suite}): not on the mirror when last tried (delete {} to retry)", neg.display());
            continue;
        }
        log!("downloading {url}");
        let part = srcdir.join(format!("{file}.part"));
        let st = Command::new("curl").args(["-fsSL", "--retry", "2", "-o"]).arg(&part).arg(&url).status()?;
        if !st.success() {
            warn!("{file} ({suite}) is not downloadable from the mirror; trying an older 6.1");
            let _ = std::fs::remove_file(&part);
            let _ = std::fs::write(&neg, &url);
            continue;
        }
        if let Some(want) = sum.strip_prefix("SHA256:") {
            let got = sha256_file(&part)?;
            if got != want {
                let _ = std::fs::remove_file(&part);
                bail!("checksum mismatch for {file}: {got} != {want}");
            }
        }
        std::fs::rename(&part, &path)?;
        return Ok((upver, path));
    }
    // Offline / nothing downloadable: newest cached tarball.
    let mut cached: Vec<(String, PathBuf)> = std::fs::read_dir(&srcdir)?
        .flatten()
        .filter_map(|e| {
            let f = e.file_name().to_string_lossy().into_owned();
            let v = f.strip_prefix("linux_")?.strip_suffix(".orig.tar.xz")?.to_string();
            v.starts_with("6.1.").then(|| (v, e.path()))
        })
        .collect();
    cached.sort_by(|a, b| util::deb_cmp(&b.0, &a.0));
    match cached.into_iter().next() {
        Some((v, p)) => {
            warn!("using newest cached 6.1 source {}", p.display());
            Ok((v, p))
        }
        None => bail!("no 6.1 orig tarball available (archive unreachable and nothing cached)"),
    }
}

fn kernel_6_1() -> Result<Kernel> {
    let lines = fragment_lines()?;
    let hash = sha256_hex((lines.join("\n") + "\n").as_bytes())?;
    let key_hash = &hash[..12];
    let out_root = cache_dir().join("kernels").join("6.1");
    let (upver, tarball) = match source_6_1() {
        Ok(x) => x,
        Err(e) => {
            // Last resort: any cached build with this fragment.
            let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(&out_root)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let v = n.strip_suffix(&format!("-{key_hash}"))?.to_string();
                    e.path().join("bzImage").exists().then(|| (v, e.path()))
                })
                .collect();
            found.sort_by(|a, b| util::deb_cmp(&b.0, &a.0));
            let Some((v, dir)) = found.into_iter().next() else {
                return Err(e);
            };
            warn!("{e:#}; using cached 6.1 build {}", dir.display());
            return Ok(Kernel {
                name: "6.1".into(),
                version: v.clone(),
                origin: format!("built from linux_{v}.orig.tar.xz (cached)"),
                vmlinuz: dir.join("bzImage"),
                modules: None,
                fresh: false,
            });
        }
    };
    let out = out_root.join(format!("{upver}-{key_hash}"));
    let bz = out.join("bzImage");
    let origin = format!("built from {} + kernel/6.1.fragment ({key_hash})", tarball.file_name().unwrap().to_string_lossy());
    let cached = |upver: String, origin: String, bz: PathBuf| Kernel {
        name: "6.1".into(),
        version: upver,
        origin,
        vmlinuz: bz,
        modules: None,
        fresh: false,
    };
    if bz.exists() {
        return Ok(cached(upver, origin, bz));
    }
    // One builder at a time per source tree (concurrent xtask runs); another
    // run may have built it while we waited.
    let _lock = BuildLock::acquire(&cache_dir().join("build").join(format!("linux-{upver}.lock")))?;
    if bz.exists() {
        return Ok(cached(upver, origin, bz));
    }
    build_6_1(&upver, &tarball, &lines, &out)?;
    Ok(Kernel { name: "6.1".into(), version: upver, origin, vmlinuz: bz, modules: None, fresh: true })
}

fn build_6_1(upver: &str, tarball: &Path, lines: &[String], out: &Path) -> Result<()> {
    let build = cache_dir().join("build");
    std::fs::create_dir_all(&build)?;
    let src = build.join(format!("linux-{upver}"));
    let marker = src.join(".xtask-extracted");
    if !marker.exists() {
        if src.exists() {
            std::fs::remove_dir_all(&src)?;
        }
        log!("extracting {} into {}", tarball.display(), build.display());
        output(Command::new("tar").arg("-xf").arg(tarball).arg("-C").arg(&build))?;
        if !src.join("Makefile").exists() {
            bail!("{} did not unpack to {}", tarball.display(), src.display());
        }
        std::fs::write(&marker, "")?;
    }
    let logf = src.join("xtask-build.log");
    let make = |args: &[&str]| -> Result<()> {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&logf)?;
        let mut c = Command::new("make");
        c.arg("-C").arg(&src).args(args);
        c.stdout(log_file.try_clone()?).stderr(log_file);
        log!("$ {} (output in {})", util::describe(&c), logf.display());
        let st = c.status()?;
        if !st.success() {
            let text = std::fs::read_to_string(&logf).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            for l in tail.into_iter().rev() {
                println!("  | {l}");
            }
            bail!("make {} failed", args.join(" "));
        }
        Ok(())
    };
    let _ = std::fs::remove_file(&logf);
    make(&["tinyconfig"])?;
    let cfg = src.join(".config");
    let mut text = std::fs::read_to_string(&cfg)?;
    text.push_str("\n# --- kernel/6.1.fragment (xtask) ---\n");
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(&cfg, text)?;
    make(&["olddefconfig"])?;
    // Verify every requested option survived olddefconfig.
    let final_cfg = std::fs::read_to_string(&cfg)?;
    let have: std::collections::HashSet<&str> = final_cfg.lines().map(str::trim).collect();
    let missing: Vec<&String> = lines.iter().filter(|l| !have.contains(l.as_str())).collect();
    if !missing.is_empty() {
        for m in &missing {
            println!("xtask: ERROR: {m} requested by kernel/6.1.fragment is not set after olddefconfig");
        }
        bail!("{} option(s) of kernel/6.1.fragment did not stick (unmet dependencies?)", missing.len());
    }
    log!("config verified: all {} fragment options are set", lines.len());
    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    log!("building linux {upver} bzImage with -j{jobs} (takes several minutes)");
    let t = std::time::Instant::now();
    make(&[&format!("-j{jobs}"), "bzImage"])?;
    log!("kernel build took {}", util::fmt_dur(t.elapsed()));
    std::fs::create_dir_all(out)?;
    std::fs::copy(src.join("arch/x86/boot/bzImage"), out.join("bzImage.tmp"))?;
    std::fs::copy(&cfg, out.join("config"))?;
    std::fs::rename(out.join("bzImage.tmp"), out.join("bzImage"))?;
    Ok(())
}

pub fn cmd_kernels(sel: &str) -> Result<()> {
    let mut rows = vec![];
    let mut failed = false;
    for name in expand(sel)? {
        match get(&name) {
            Ok(k) => rows.push(vec![
                k.name.clone(),
                k.version.clone(),
                k.vmlinuz.display().to_string(),
                k.modules.as_ref().map(|m| m.display().to_string()).unwrap_or_else(|| "built-in".into()),
                if k.fresh { "fresh".into() } else { "cached".into() },
            ]),
            Err(e) => {
                println!("xtask: ERROR: kernel {name}: {e:#}");
                failed = true;
                rows.push(vec![name.clone(), "?".into(), "-".into(), "-".into(), "FAILED".into()]);
            }
        }
    }
    println!();
    util::print_table(&["kernel", "version", "vmlinuz", "modules", "state"], &rows);
    if failed {
        bail!("some kernels are unavailable");
    }
    Ok(())
}

/// A lock directory holding the owner's pid; stale locks (dead owner) are taken over.
struct BuildLock(PathBuf);

impl BuildLock {
    fn acquire(path: &Path) -> Result<BuildLock> {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let mut said = false;
        loop {
            match std::fs::create_dir(path) {
                Ok(()) => {
                    std::fs::write(path.join("pid"), std::process::id().to_string())?;
                    return Ok(BuildLock(path.to_path_buf()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(path.join("pid")).unwrap_or_default();
                    let alive = !owner.trim().is_empty() && Path::new(&format!("/proc/{}", owner.trim())).exists();
                    if !alive {
                        std::thread::sleep(std::time::Duration::from_millis(500));
                        // re-read: the owner may have been writing its pid
                        let again = std::fs::read_to_string(path.join("pid")).unwrap_or_default();
                        if again == owner {
                            let _ = std::fs::remove_dir_all(path);
                        }
                        continue;
                    }
                    if !said {
                        log!("waiting for another xtask (pid {}) building in the same tree", owner.trim());
                        said = true;
                    }
                    std::thread::sleep(std::time::Duration::from_secs(2));
                }
                Err(e) => return Err(e).with_context(|| format!("creating lock {}", path.display())),
            }
        }
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
