//! Ready for crates.io: the publishable crates have the metadata crates.io
//! and docs.rs need, package cleanly, and build with the Rust version they
//! declare.

use crate::log;
use crate::util::{self, workspace_root};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;

/// Files a crate's build reads besides `src/` and `build.rs`: if the
/// package left one out, only a verifying build (which CI skips) would see it.
const BUILD_INPUTS: &[(&str, &[&str])] = &[("ublk-sys", &["build.rs", "wrapper.h", "src/probe_helpers.c"])];

/// A workspace member that crates.io would accept (`publish` not `false`).
struct Pkg {
    name: String,
    rust_version: Option<String>,
    meta: Value,
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(util::cargo());
    c.args(args).current_dir(workspace_root());
    c
}

/// The members of the workspace that can be published, in workspace order.
fn publishable() -> Result<Vec<Pkg>> {
    let out = util::output(&mut cargo(&["metadata", "--no-deps", "--format-version", "1"]))?;
    let v: Value = serde_json::from_str(&out).context("parsing cargo metadata")?;
    let pkgs = v["packages"].as_array().context("cargo metadata has no packages")?;
    Ok(pkgs
        .iter()
        // `publish = false` shows as [], no restriction as null.
        .filter(|p| p["publish"].as_array().is_none_or(|r| !r.is_empty()))
        .map(|p| Pkg {
            name: p["name"].as_str().unwrap_or("?").to_string(),
            rust_version: p["rust_version"].as_str().map(str::to_string),
            meta: p.clone(),
        })
        .collect())
}

/// What crates.io, docs.rs and users need from a package's manifest, as
/// "field: problem; fix" lines (empty when nothing is missing).
fn metadata_problems(p: &Value) -> Vec<String> {
    let mut v = Vec::new();
    let s = |k: &str| p[k].as_str().map(str::trim).filter(|s| !s.is_empty());
    if s("description").is_none() {
        v.push("no description: add `description = \"...\"` (crates.io refuses a package without one)".to_string());
    }
    if s("license").is_none() && s("license_file").is_none() {
        v.push("no license: add `license.workspace = true`".to_string());
    }
    match s("repository") {
        None => v.push("no repository: add `repository.workspace = true`".to_string()),
        Some(r) if r.contains("example.invalid") || !r.starts_with("https://") => {
            v.push(format!("repository {r} is a placeholder: set the real https:// URL in [workspace.package]"))
        }
        Some(_) => {}
    }
    match s("readme") {
        None => v.push("no readme: add `readme = \"README.md\"` and the file, for the crates.io page".to_string()),
        Some(r) => {
            let dir = std::path::Path::new(p["manifest_path"].as_str().unwrap_or("")).parent().map(|d| d.join(r));
            if !dir.as_ref().is_some_and(|f| f.is_file()) {
                v.push(format!("readme {r} does not exist next to the Cargo.toml"));
            }
        }
    }
    let n_keywords = p["keywords"].as_array().map_or(0, Vec::len);
    if !(1..=5).contains(&n_keywords) {
        v.push(format!("{n_keywords} keywords: crates.io takes 1 to 5 (`keywords = [...]`)"));
    }
    if p["categories"].as_array().is_none_or(Vec::is_empty) {
        v.push("no categories: add `categories = [...]` (slugs from crates.io/category_slugs)".to_string());
    }
    if s("rust_version").is_none() {
        v.push("no rust-version: add `rust-version.workspace = true` or the crate's own".to_string());
    }
    // `[package.metadata.docs.rs]` is the dotted key docs.rs: metadata.docs.rs.
    if p["metadata"]["docs"]["rs"]["targets"].as_array().is_none_or(Vec::is_empty) {
        v.push("no [package.metadata.docs.rs] targets: docs.rs would try every default target, and this is Linux-only code".to_string());
    }
    for d in p["dependencies"].as_array().into_iter().flatten() {
        let dev = d["kind"].as_str() == Some("dev");
        if !dev && d["path"].is_string() && d["req"].as_str() == Some("*") {
            v.push(format!(
                "dependency {} is a path without a version: add `version = \"...\"` next to its path",
                d["name"].as_str().unwrap_or("?")
            ));
        }
    }
    v
}

/// The CI step: manifests complete, `cargo package` and `cargo publish
/// --dry-run` (without the verifying build, which needs bindgen's libclang
/// and the registry) succeed for every publishable crate, and the packages
/// hold their READMEs and build inputs.
pub fn check() -> Result<()> {
    let pkgs = publishable()?;
    if pkgs.is_empty() {
        bail!("no publishable package in the workspace (cargo metadata lists none without publish = false)");
    }
    let names: Vec<&str> = pkgs.iter().map(|p| p.name.as_str()).collect();
    log!("publishable crates: {}", names.join(", "));

    let mut problems = Vec::new();
    for p in &pkgs {
        for m in metadata_problems(&p.meta) {
            problems.push(format!("{}: {m}", p.name));
        }
    }
    if !problems.is_empty() {
        bail!("crate manifests are not ready for crates.io:\n  {}", problems.join("\n  "));
    }

    let mut sel = vec![];
    for n in &names {
        sel.extend(["-p", n]);
    }
    // --allow-dirty: the contents matter here, not whether they are committed.
    let mut args = vec!["package", "--no-verify", "--allow-dirty"];
    args.extend(&sel);
    util::run(&mut cargo(&args)).context("cargo package failed")?;

    for p in &pkgs {
        let files = util::output(&mut cargo(&["package", "--list", "--allow-dirty", "-p", &p.name]))?;
        let files: Vec<&str> = files.lines().map(str::trim).collect();
        let mut want = vec!["Cargo.toml", "README.md"];
        want.extend(BUILD_INPUTS.iter().filter(|(n, _)| *n == p.name).flat_map(|(_, f)| f.iter().copied()));
        let missing: Vec<&str> = want.into_iter().filter(|f| !files.contains(f)).collect();
        if !missing.is_empty() {
            bail!("the {} package leaves out {}: check `include`/`exclude` in its Cargo.toml", p.name, missing.join(", "));
        }
    }

    let mut args = vec!["publish", "--dry-run", "--no-verify", "--allow-dirty"];
    args.extend(&sel);
    util::run(&mut cargo(&args)).context("cargo publish --dry-run failed")?;
    log!("cargo package and cargo publish --dry-run: ok for {}", names.join(", "));
    Ok(())
}

/// The publishable crates of this workspace that `name` depends on, directly
/// or through one another (they are not on crates.io yet: they get patched in).
fn local_deps(pkgs: &[Pkg], name: &str) -> Vec<String> {
    let deps_of = |n: &str| -> Vec<String> {
        let p = pkgs.iter().find(|p| p.name == n);
        let deps = p.and_then(|p| p.meta["dependencies"].as_array()).into_iter().flatten();
        deps.filter_map(|d| d["name"].as_str()).filter(|d| pkgs.iter().any(|p| p.name == *d)).map(str::to_string).collect()
    };
    let mut found: Vec<String> = vec![];
    let mut todo = deps_of(name);
    while let Some(d) = todo.pop() {
        if d != name && !found.contains(&d) {
            todo.extend(deps_of(&d));
            found.push(d);
        }
    }
    found.sort();
    found
}

/// The CI step: every publishable crate, as packaged for crates.io, builds
/// (`cargo check --all-targets`) with the Rust of its `rust-version`.
///
/// The packages are checked rather than the workspace because the
/// workspace's Cargo.lock holds every member's dependencies: an old cargo
/// cannot even read it when one of them (clap 4.6, edition 2024) is newer
/// than the libraries need. Each unpacked package is its own workspace with
/// the lock `cargo package` wrote for it; the other crates of this
/// workspace it depends on are patched in from their unpacked packages.
/// A toolchain that is not installed is installed with rustup (minimal
/// profile, from static.rust-lang.org); without rustup, or offline, the step
/// fails, naming the toolchain.
pub fn msrv() -> Result<()> {
    let pkgs = publishable()?;
    let root = workspace_root();
    let mut sel = vec!["package", "--no-verify", "--allow-dirty", "--quiet"];
    for p in &pkgs {
        sel.extend(["-p", p.name.as_str()]);
    }
    util::run(&mut cargo(&sel)).context("cargo package failed")?;
    let unpacked = root.join("target").join("msrv");
    if unpacked.exists() {
        std::fs::remove_dir_all(&unpacked).with_context(|| format!("removing {}", unpacked.display()))?;
    }
    std::fs::create_dir_all(&unpacked)?;
    let mut dirs = BTreeMap::new();
    for p in &pkgs {
        let version = p.meta["version"].as_str().unwrap_or("?");
        let krate = root.join("target").join("package").join(format!("{}-{version}.crate", p.name));
        util::run(Command::new("tar").arg("-xzf").arg(&krate).arg("-C").arg(&unpacked))?;
        let dir = unpacked.join(format!("{}-{version}", p.name));
        // Its own workspace, not a stray member of ours.
        let manifest = dir.join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
        std::fs::write(&manifest, format!("{text}\n[workspace]\n"))?;
        dirs.insert(p.name.clone(), dir);
    }

    let mut rows = vec![];
    for p in &pkgs {
        let Some(version) = &p.rust_version else {
            bail!("{} has no rust-version: add one to its Cargo.toml", p.name);
        };
        let toolchain = format!("{version}-x86_64-unknown-linux-gnu");
        let list = Command::new("rustup")
            .args(["toolchain", "list"])
            .output()
            .with_context(|| format!("running rustup, needed for Rust {version} (rust-version of {}): install rustup", p.name))?;
        if !String::from_utf8_lossy(&list.stdout).lines().any(|l| l.starts_with(&toolchain)) {
            log!("installing Rust {version} (rust-version of {}) with rustup", p.name);
            if let Err(e) = util::run(Command::new("rustup").args(["toolchain", "install", &toolchain, "--profile", "minimal"])) {
                // A machine that cannot download toolchains cannot check
                // this; say so in the CI summary rather than pass or fail.
                bail!(
                    "{}: Rust {version} (rust-version of {}) could not be installed ({e:#}); run `rustup toolchain install {version}` where the network allows it",
                    crate::SKIPPED,
                    p.name
                );
            }
        }
        let mut c = Command::new("rustup");
        c.args(["run", &toolchain, "cargo", "check", "--all-targets", "--quiet"]);
        for other in local_deps(&pkgs, &p.name) {
            c.arg("--config").arg(format!("patch.crates-io.{other}.path={:?}", dirs[&other].display().to_string()));
        }
        // The xtask's own cargo and rustc (set by `cargo run`) are the default toolchain's.
        c.current_dir(&dirs[&p.name])
            .env("CARGO_TARGET_DIR", root.join("target").join("msrv-target"))
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .env_remove("RUSTDOC");
        util::run(&mut c).with_context(|| {
            format!(
                "{} does not build with Rust {version}, its rust-version: raise rust-version in its Cargo.toml, or do without the newer feature",
                p.name
            )
        })?;
        log!("{} builds with Rust {version}", p.name);
        rows.push(vec![p.name.clone(), version.clone(), "ok".into()]);
    }
    util::print_table(&["crate", "rust-version", "cargo check --all-targets"], &rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete() -> Value {
        serde_json::json!({
            "name": "x",
            "description": "d",
            "license": "MIT OR Apache-2.0",
            "repository": "https://github.com/ublk-rs/ublk",
            "readme": "Cargo.toml",
            "manifest_path": concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
            "keywords": ["ublk"],
            "categories": ["os::linux-apis"],
            "rust_version": "1.82",
            "metadata": {"docs": {"rs": {"targets": ["x86_64-unknown-linux-gnu"]}}},
            "dependencies": [{"name": "ublk-sys", "path": "/x", "req": "^0.1.0", "kind": null}],
        })
    }

    #[test]
    fn local_deps_are_transitive() {
        let pkg = |name: &str, deps: &[&str]| Pkg {
            name: name.into(),
            rust_version: None,
            meta: serde_json::json!({"dependencies": deps.iter().map(|d| serde_json::json!({"name": d})).collect::<Vec<_>>()}),
        };
        let pkgs = [pkg("sys", &["libc"]), pkg("lib", &["sys", "libc"]), pkg("cli", &["lib", "clap"])];
        assert_eq!(local_deps(&pkgs, "cli"), ["lib", "sys"]);
        assert_eq!(local_deps(&pkgs, "lib"), ["sys"]);
        assert!(local_deps(&pkgs, "sys").is_empty());
    }

    #[test]
    fn complete_manifest_passes() {
        assert_eq!(metadata_problems(&complete()), Vec::<String>::new());
    }

    #[test]
    fn each_gap_is_named() {
        let cases: &[(&str, Value, &str)] = &[
            ("description", Value::Null, "no description"),
            ("repository", "https://example.invalid/ublk".into(), "placeholder"),
            ("readme", "NOPE.md".into(), "does not exist"),
            ("keywords", serde_json::json!(["a", "b", "c", "d", "e", "f"]), "6 keywords"),
            ("categories", serde_json::json!([]), "no categories"),
            ("rust_version", Value::Null, "no rust-version"),
            ("metadata", serde_json::json!({}), "docs.rs"),
            ("dependencies", serde_json::json!([{"name": "ublk", "path": "/x", "req": "*", "kind": null}]), "path without a version"),
        ];
        for (field, value, want) in cases {
            let mut p = complete();
            p[*field] = value.clone();
            let got = metadata_problems(&p);
            assert!(got.len() == 1 && got[0].contains(want), "{field}: {got:?}");
        }
    }
}
