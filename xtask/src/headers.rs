//! linux-libc-dev header trees of bookworm (6.1), trixie (6.12) and sid (7.x),
//! and the header matrix: build + test ublk-sys/ublk against each.

use crate::apt;
use crate::util::{self, cache_dir, workspace_root};
use crate::{log, warn};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::Command;

pub const SUITES: &[&str] = &["bookworm", "trixie", "sid"];

/// Download/unpack linux-libc-dev of `suite` and return the include dir
/// (the one holding linux/ublk_cmd.h). Also returns the package version.
pub fn headers_dir(suite: &str) -> Result<(PathBuf, String)> {
    if !SUITES.contains(&suite) {
        bail!("unknown suite {suite} (expected one of {SUITES:?})");
    }
    let apt = apt::get()?;
    apt.update();
    let base = cache_dir().join("headers").join(suite);
    let resolved: Result<(PathBuf, String)> = (|| {
        let cands: Vec<_> = apt
            .candidates(&["linux-libc-dev".to_string()])?
            .into_iter()
            .filter(|c| c.suite == suite || c.suite == format!("{suite}-security"))
            .collect();
        if cands.is_empty() {
            bail!("no linux-libc-dev in {suite}");
        }
        let mut last_err = None;
        for c in cands {
            let dir = base.join(&c.version);
            if dir.join(".xtask-ready").exists() {
                return Ok((dir, c.version));
            }
            // Versions the mirror did not have are retried after a day.
            let neg = base.join(format!("{}.unavailable", c.version));
            let recent = std::fs::metadata(&neg)
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().map(|e| e.as_secs() < 86400).unwrap_or(false))
                .unwrap_or(false);
            if recent {
                continue;
            }
            match apt.download(&c.pkg, &c.version) {
                Ok(deb) => {
                    apt::extract(&deb, &dir)?;
                    std::fs::write(dir.join(".xtask-ready"), "")?;
                    return Ok((dir, c.version));
                }
                Err(e) => {
                    warn!("linux-libc-dev {} ({}) not downloadable: {}", c.version, c.suite, e.to_string().lines().next().unwrap_or(""));
                    let _ = std::fs::create_dir_all(&base);
                    let _ = std::fs::write(&neg, "");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no downloadable linux-libc-dev in {suite}")))
    })();
    let (dir, version) = match resolved {
        Ok(x) => x,
        Err(e) => {
            // Newest cached version of that suite.
            let mut cached: Vec<(String, PathBuf)> = std::fs::read_dir(&base)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().join(".xtask-ready").exists())
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .collect();
            cached.sort_by(|a, b| util::deb_cmp(&b.0, &a.0));
            let Some((v, d)) = cached.into_iter().next() else {
                return Err(e);
            };
            warn!("{e:#}; using cached linux-libc-dev {v} for {suite}");
            (d, v)
        }
    };
    let inc = dir.join("usr/include");
    if !inc.join("linux/ublk_cmd.h").exists() {
        bail!("{} has no linux/ublk_cmd.h", inc.display());
    }
    // asm/ lives under the multiarch dir; make the tree self-contained for
    // tools that pass a single -I.
    let asm = inc.join("asm");
    if !asm.exists() && inc.join("x86_64-linux-gnu/asm").is_dir() {
        let _ = std::os::unix::fs::symlink("x86_64-linux-gnu/asm", &asm);
    }
    Ok((inc, version))
}

#[derive(Default)]
struct Row {
    suite: String,
    pkg_version: String,
    header_version: String,
    build_ok: bool,
    passed: u64,
    failed: u64,
    tests_ok: bool,
    flags: String,
    commands: String,
}

fn one(suite: &str) -> Row {
    let mut row =
        Row { suite: suite.to_string(), header_version: "?".into(), flags: "?".into(), commands: "?".into(), ..Default::default() };
    let (inc, ver) = match headers_dir(suite) {
        Ok(x) => x,
        Err(e) => {
            println!("xtask: ERROR: headers for {suite}: {e:#}");
            row.pkg_version = "?".into();
            return row;
        }
    };
    row.pkg_version = ver;
    log!("=== headers {suite}: linux-libc-dev {} -> {}", row.pkg_version, inc.display());
    // One target dir for every suite: the dependencies build once, and the
    // changed UBLK_SYS_KERNEL_HEADERS reruns ublk-sys's build script.
    let target = workspace_root().join("target").join("headers");
    let env_cmd = |args: &[&str]| {
        let mut c = Command::new(util::cargo());
        c.args(args).current_dir(workspace_root()).env("UBLK_SYS_KERNEL_HEADERS", &inc).env("CARGO_TARGET_DIR", &target);
        c
    };
    row.build_ok = util::run(&mut env_cmd(&["build", "-p", "ublk-sys", "-p", "ublk"])).is_ok();
    if !row.build_ok {
        println!("xtask: ERROR: bindings generation/build failed for {suite}");
        return row;
    }
    match util::run_tee(&mut env_cmd(&["test", "-p", "ublk-sys", "-p", "ublk"])) {
        Ok((ok, out)) => {
            let c = crate::testlog::counts(&out);
            row.passed = c.passed;
            row.failed = c.failed;
            row.tests_ok = ok;
        }
        Err(e) => println!("xtask: ERROR: cargo test: {e:#}"),
    }
    let mut c = env_cmd(&["run", "-q", "-p", "ublk-sys", "--example", "header_info"]);
    match util::output(&mut c) {
        Ok(out) => {
            for l in out.lines() {
                let l = l.trim();
                if let Some(v) = l.strip_prefix("linux_version") {
                    row.header_version = v.trim().to_string();
                } else if let Some(v) = l.strip_prefix("flags") {
                    row.flags = v.trim().split(':').next().unwrap_or("?").trim().to_string();
                } else if let Some(v) = l.strip_prefix("commands") {
                    row.commands = v.trim().split(':').next().unwrap_or("?").trim().to_string();
                }
            }
            print!("{out}");
        }
        Err(e) => warn!("header_info example failed: {}", e.to_string().lines().next().unwrap_or("")),
    }
    row
}

pub fn cmd_headers(suite: Option<&str>, print_dir: Option<&str>) -> Result<()> {
    if let Some(s) = print_dir {
        util::LOG_TO_STDERR.store(true, std::sync::atomic::Ordering::Relaxed);
        let s = if s == "newest" { "sid" } else { s };
        let (inc, _) = headers_dir(s)?;
        println!("{}", inc.display());
        return Ok(());
    }
    let suites: Vec<&str> = match suite {
        Some("all") | None => SUITES.to_vec(),
        Some(s) => vec![s],
    };
    let rows: Vec<Row> = suites.iter().map(|s| one(s)).collect();
    println!();
    util::print_table(
        &["suite", "linux-libc-dev", "header version", "bindings", "tests passed/failed", "#flags", "#commands"],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.suite.clone(),
                    r.pkg_version.clone(),
                    r.header_version.clone(),
                    if r.build_ok { "ok".into() } else { "FAILED".into() },
                    if r.build_ok { format!("{}/{}{}", r.passed, r.failed, if r.tests_ok { "" } else { " (FAILED)" }) } else { "-".into() },
                    r.flags.clone(),
                    r.commands.clone(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let bad: Vec<&str> = rows.iter().filter(|r| !r.build_ok).map(|r| r.suite.as_str()).collect();
    if !bad.is_empty() {
        bail!("bindings generation failed for: {}", bad.join(", "));
    }
    let tbad: Vec<&str> = rows.iter().filter(|r| !r.tests_ok).map(|r| r.suite.as_str()).collect();
    if !tbad.is_empty() {
        bail!("tests failed for: {}", tbad.join(", "));
    }
    missing_prerequisites_are_one_line()
}

/// A missing header, libclang or C compiler must stop the build with one
/// line naming the problem and the packages of Debian/Ubuntu and Fedora.
fn missing_prerequisites_are_one_line() -> Result<()> {
    let empty = workspace_root().join("target").join("headers-missing").join("include");
    std::fs::create_dir_all(&empty)?;
    let cases = [
        ("UBLK_SYS_KERNEL_HEADERS", empty.into_os_string(), "has no linux/ublk_cmd.h"),
        ("LIBCLANG_PATH", "/nonexistent-libclang-dir".into(), "libclang not found"),
        ("CC", "/nonexistent-cc".into(), "C compiler /nonexistent-cc cannot be run"),
    ];
    for (var, value, cause) in cases {
        let out = std::process::Command::new(util::cargo())
            .args(["build", "-p", "ublk-sys", "--color", "never"])
            .current_dir(workspace_root())
            .env(var, &value)
            .env("CARGO_TARGET_DIR", workspace_root().join("target").join("headers"))
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err.lines().find(|l| l.starts_with("error: ublk-sys")).unwrap_or("");
        let names_fix = ["Debian/Ubuntu: apt-get install", "Fedora: dnf install"].iter().all(|p| line.contains(p));
        if out.status.success() || !line.contains(cause) || !names_fix {
            bail!(
                "{var}={} did not stop the build with the one-line error ({cause}, with the Debian/Ubuntu and Fedora packages):\n{err}",
                value.to_string_lossy()
            );
        }
        log!("{var}={}: the build stops with: {line}", value.to_string_lossy());
    }
    Ok(())
}
