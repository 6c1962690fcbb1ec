//! Builds of the workspace for the VM: against the newest (sid) kernel
//! headers, into target/vm so host builds are not disturbed.

use crate::headers;
use crate::util::{self, workspace_root};
use crate::{log, warn};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Artifacts {
    pub bins: Vec<PathBuf>,
    pub tests: Vec<PathBuf>,
}

pub fn target_dir() -> PathBuf {
    workspace_root().join("target").join("vm")
}

/// Run cargo with JSON messages; return executables of compiler-artifact
/// messages accepted by `want(profile_test, kinds)`.
fn cargo_json(args: &[&str], inc: &PathBuf, target: &Path, want: impl Fn(bool, &[String]) -> bool) -> Result<Vec<PathBuf>> {
    let mut c = Command::new(util::cargo());
    c.args(args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(workspace_root())
        .env("UBLK_SYS_KERNEL_HEADERS", inc)
        .env("CARGO_TARGET_DIR", target)
        .stdout(Stdio::piped());
    log!("$ UBLK_SYS_KERNEL_HEADERS={} CARGO_TARGET_DIR={} {}", inc.display(), target.display(), util::describe(&c));
    let mut child = c.spawn()?;
    let mut v = vec![];
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        let Ok(j) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if j["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = j["executable"].as_str() else {
            continue;
        };
        let test = j["profile"]["test"].as_bool().unwrap_or(false);
        let kinds: Vec<String> =
            j["target"]["kind"].as_array().map(|a| a.iter().filter_map(|k| k.as_str().map(str::to_string)).collect()).unwrap_or_default();
        if want(test, &kinds) {
            v.push(PathBuf::from(exe));
        }
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("cargo {} failed ({st})", args.join(" "));
    }
    v.sort();
    v.dedup();
    Ok(v)
}

/// Build the workspace binaries (and optionally test executables) for the VM.
/// Profile `vmtest`: the dev profile's checks, optimised (see Cargo.toml).
pub fn build(with_tests: bool) -> Result<Artifacts> {
    build_for("sid", &target_dir(), with_tests, "vmtest")
}

/// [`build`] against the headers of Debian `suite`, into `target`.
pub fn build_for(suite: &str, target: &Path, with_tests: bool, profile: &str) -> Result<Artifacts> {
    let (inc, ver) = headers::headers_dir(suite).with_context(|| format!("{suite} kernel headers for the VM build"))?;
    log!("building for the VM against linux-libc-dev {ver} ({suite})");
    // The library's examples run in the VM too (tests/tests/examples.rs).
    let mut bins = cargo_json(
        &["build", "--profile", profile, "--workspace", "--exclude", "xtask", "--bins", "--examples"],
        &inc,
        target,
        |test, kinds| !test && kinds.iter().any(|k| k == "bin" || k == "example"),
    )?;
    let tests = if with_tests {
        cargo_json(&["test", "--profile", profile, "--workspace", "--exclude", "xtask", "--no-run"], &inc, target, |test, _| test)?
    } else {
        vec![]
    };
    bins.extend(extra_bins());
    log!(
        "VM artifacts: bins [{}], {} test executables",
        bins.iter().map(|b| b.file_name().unwrap().to_string_lossy().into_owned()).collect::<Vec<_>>().join(", "),
        tests.len()
    );
    Ok(Artifacts { bins, tests })
}

/// target/vm/**/ublk-c-example* executables and $UBLK_VM_EXTRA_BINS.
fn extra_bins() -> Vec<PathBuf> {
    let mut found: std::collections::BTreeMap<String, (std::time::SystemTime, PathBuf)> = Default::default();
    let mut stack = vec![target_dir()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let name = e.file_name().to_string_lossy().into_owned();
            if ft.is_dir() {
                if !["incremental", ".fingerprint", "initramfs"].contains(&name.as_str()) {
                    stack.push(e.path());
                }
            } else if ft.is_file() && name.starts_with("ublk-c-example") && !name.contains('.') {
                let Ok(md) = e.metadata() else { continue };
                if md.permissions().mode() & 0o111 == 0 {
                    continue;
                }
                let t = md.modified().unwrap_or(std::time::UNIX_EPOCH);
                let newer = found.get(&name).map(|(t0, _)| t > *t0).unwrap_or(true);
                if newer {
                    found.insert(name, (t, e.path()));
                }
            }
        }
    }
    let mut v: Vec<PathBuf> = found.into_values().map(|(_, p)| p).collect();
    if let Ok(extra) = std::env::var("UBLK_VM_EXTRA_BINS") {
        for p in extra.split(':').filter(|s| !s.is_empty()) {
            let p = PathBuf::from(p);
            if p.is_file() {
                v.push(p);
            } else {
                warn!("UBLK_VM_EXTRA_BINS: {} does not exist", p.display());
            }
        }
    }
    v
}

/// Release builds for `cargo xtask bench`: our ublk-null (against the newest
/// headers) and libublk's null target (bench/libublk-null, its own workspace),
/// copied to target/vm/bench/ under the names the guest script runs.
pub fn build_bench() -> Result<Vec<PathBuf>> {
    let (inc, ver) = headers::headers_dir("sid").context("sid kernel headers for the VM build")?;
    log!("building release binaries for the bench against linux-libc-dev {ver} (sid)");
    let ours = cargo_json(
        &["build", "--release", "-p", "ublk-cli", "--bin", "ublk-null", "--bin", "ublk"],
        &inc,
        &target_dir(),
        |test, kinds| !test && kinds.iter().any(|k| k == "bin"),
    )?;
    let out = target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let lib_target = target_dir().join("libublk");
    let mut c = Command::new(util::cargo());
    c.args(["build", "--release", "--manifest-path"])
        .arg(workspace_root().join("bench/libublk-null/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &lib_target);
    util::run(&mut c).context("building bench/libublk-null (libublk from crates.io)")?;
    let lib = out.join("libublk-null");
    std::fs::copy(lib_target.join("release/libublk-null-bench"), &lib)?;
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o755))?;
    let mut bins = ours;
    bins.push(lib);
    // E.g. another commit's CLI, for a bench target that names it.
    bins.extend(extra_bins());
    Ok(bins)
}
