//! `cargo xtask`: kernels, header matrix, QEMU test runner, demo and CI.

mod apt;
mod bench;
mod benchsvg;
mod dependent;
mod headers;
mod kernels;
mod package;
mod testlog;
mod util;
mod vm;
mod wsbuild;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};
use util::{sh_quote, workspace_root};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ublk-rs developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Resolve, download or build the test kernels and show where they are cached.
    Kernels {
        /// 6.1, 6.12, newest or all
        #[arg(long, default_value = "all")]
        kernel: String,
    },
    /// Build and test ublk-sys/ublk against the bookworm, trixie and sid UAPI headers.
    Headers {
        /// Only this suite (bookworm, trixie, sid)
        #[arg(long)]
        suite: Option<String>,
        /// Just print the include dir of a suite (bookworm, trixie, sid or newest)
        #[arg(long, value_name = "SUITE")]
        print_dir: Option<String>,
    },
    /// Run all test executables of the workspace in QEMU on each kernel.
    TestVm {
        /// 6.1, 6.12, newest or all
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Per-kernel time limit in seconds
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        /// Time limit per test executable inside the guest (0 = none): a
        /// hang's backstop; the biggest binaries (data, recovery) take 2-5
        /// minutes under TCG when the host is busy
        #[arg(long, default_value_t = 600)]
        exe_timeout: u64,
        /// Extra libtest arguments (e.g. a test name filter)
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Build the workspace against the oldest header of the matrix (Debian
    /// 12's 6.1) and check on 6.12 and the newest kernel that it negotiates
    /// (GET_FEATURES, ioctl encoding, user copy) like the newest-header build.
    OldHeader {
        /// Per-kernel time limit in seconds
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Build a crate outside the workspace that depends on `ublk` by path
    /// and version, whose main is ublk's crate doc example, and run it in the
    /// VM on the newest kernel.
    Dependent {
        /// Time limit in seconds
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Boot a kernel and run a shell command in the guest.
    Vm {
        /// 6.1, 6.12 or newest
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// Time limit in seconds
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Do not build the workspace binaries (faster for plain shell payloads)
        #[arg(long)]
        no_build: bool,
        /// Also pack the test executables into /opt/ublk/deps
        #[arg(long)]
        with_tests: bool,
        /// Command run with `sh -c` in the guest
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// ublk-null + fio demo (natively when /dev/ublk-control exists, else in a VM).
    Demo {
        /// 6.1, 6.12 or newest
        #[arg(long, default_value = "6.12")]
        kernel: String,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Use a VM even when the host has /dev/ublk-control
        #[arg(long)]
        vm: bool,
    },
    /// fio against null_blk, our ublk-null and libublk's null target (sync and
    /// async), interleaved run by run, in one VM boot per kernel.
    Bench {
        /// 6.12, newest, or both (all)
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// Runs of every job
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Seconds per fio job
        #[arg(long, default_value_t = 3)]
        runtime: u32,
        /// Write the records as JSON here
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Time limit per VM in seconds
        #[arg(long, default_value_t = 5400)]
        timeout: u64,
        /// Targets, space-separated (default: null_blk ublk-null
        /// ublk-null+twin ublk-null+async libublk-sync libublk-async
        /// ublk-loop+copy ublk-loop+user-copy). Variants of ours:
        /// ublk-null+copy (--data-copy), ublk-null+async (the async null
        /// target), ublk-null+affinity / +away / +unpinned / +auto
        /// (--placement; also on ublk-nbd),
        /// ublk-null+pollN (--busy-poll-us N), +batch (--batch, 7.0+) and +nobatch (--no-batch) on any ublk target, +twin (the same again, for the
        /// noise); combine as ublk-null+poll0+copy. ublk-loop+copy,
        /// ublk-loop+user-copy, ublk-loop+zero-copy and ublk-loop+auto-buf-reg:
        /// the loop target over a tmpfs file on that data path.
        /// nbd: ublk-nbd (ours) and nbd.ko (the kernel's client, by nbd-client;
        /// 6.12 and newest) against one qemu-nbd export over loopback TCP,
        /// Q of QxJ connections; ublk-nbd+simple: ours without structured
        /// replies. E.g. --targets nbd --jobs "qd64 128k" --configs "1x1 2x2"
        #[arg(long)]
        targets: Option<String>,
        /// Only jobs whose name contains one of these (space-separated), e.g. "qd64"
        #[arg(long)]
        jobs: Option<String>,
        /// Queue/fio-job configurations, space-separated QxJ (default "1x1 2x1 2x2")
        #[arg(long)]
        configs: Option<String>,
        /// vCPUs of the VM (sets UBLK_VM_CPUS). Give it host cores to match:
        /// TCG runs a vCPU per host thread.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
        cpus: u32,
        /// Count instructions instead of running free: QEMU's `-icount
        /// shift=N,sleep=off` (a guest nanosecond is 2^N instructions, an
        /// idle guest skips to its next timer). The vCPUs then take turns on
        /// one host thread, so IOPS and CPU time per I/O measure the
        /// instructions an I/O costs, the host's load left out: the figures
        /// repeat to a tenth of a percent where free-running TCG moves by a third.
        #[arg(long, value_name = "SHIFT", value_parser = clap::value_parser!(u32).range(0..=10))]
        icount: Option<u32>,
        /// QEMU's vCPU model (`-cpu`, sets UBLK_VM_CPU_MODEL). Under
        /// `--icount`, `max,erms=off` makes the kernel copy to and from
        /// user memory with `rep movsq` instead of `rep movsb`, which TCG
        /// counts as one instruction per byte (docs/performance.md).
        #[arg(long, value_name = "MODEL", default_value = "max")]
        cpu_model: String,
    },
    /// Print a bench JSON file (`bench --json`) as the README's markdown table.
    BenchTable {
        /// The JSON file
        file: std::path::PathBuf,
        /// Also draw the tables as an SVG picture here: per kernel and job,
        /// our IOPS against null_blk and libublk, and CPU time per I/O
        #[arg(long, value_name = "OUT")]
        svg: Option<std::path::PathBuf>,
    },
    /// Everything: fmt, headers, host tests, clippy, docs, kernels, test-vm, demo.
    Ci {
        /// Per-kernel time limit for test-vm
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Kernels { kernel } => kernels::cmd_kernels(&kernel),
        Cmd::Headers { suite, print_dir } => headers::cmd_headers(suite.as_deref(), print_dir.as_deref()),
        Cmd::TestVm { kernel, timeout, exe_timeout, test_args } => test_vm(&kernel, timeout, exe_timeout, &test_args),
        Cmd::OldHeader { timeout } => old_header(timeout),
        Cmd::Dependent { timeout } => dependent::run(timeout),
        Cmd::Vm { kernel, timeout, no_build, with_tests, cmd } => vm_cmd(&kernel, timeout, no_build, with_tests, &cmd),
        Cmd::Demo { kernel, timeout, vm } => demo(&kernel, timeout, vm),
        Cmd::Ci { timeout } => ci(timeout),
        Cmd::BenchTable { file, svg } => bench::markdown(&file, svg.as_deref()),
        Cmd::Bench { kernel, runs, runtime, json, timeout, targets, jobs, configs, cpus, icount, cpu_model } => {
            // Read by vm::run; set before any thread starts.
            std::env::set_var("UBLK_VM_CPUS", cpus.to_string());
            std::env::set_var("UBLK_VM_CPU_MODEL", cpu_model);
            if let Some(shift) = icount {
                std::env::set_var("UBLK_VM_ICOUNT", shift.to_string());
            }
            let sel = bench::Selection { targets, jobs, configs };
            bench::bench(&kernel, runs, runtime, json.as_deref(), timeout, &sel)
        }
    };
    vm::cleanup();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("xtask: ERROR: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn single_kernel(sel: &str) -> Result<String> {
    let v = kernels::expand(sel)?;
    if v.len() != 1 {
        bail!("choose one kernel (6.1, 6.12 or newest), not {sel}");
    }
    Ok(v[0].clone())
}

fn vm_cmd(kernel: &str, timeout: u64, no_build: bool, with_tests: bool, cmd: &[String]) -> Result<()> {
    let name = single_kernel(kernel)?;
    let k = kernels::get(&name)?;
    let script = if cmd.is_empty() { "uname -a; ls -l /dev/ublk-control".to_string() } else { cmd.join(" ") };
    let mut payload = vm::Payload { script: format!("{script}\n"), strip: true, ..Default::default() };
    if !no_build {
        let a = wsbuild::build(with_tests)?;
        payload.bins = a.bins;
        payload.tests = a.tests;
    }
    let common = vm::build_common(&payload)?;
    let r = vm::run(&k, &common, Duration::from_secs(timeout), &[])?;
    if !r.ok() {
        bail!("VM run on kernel {name}: {}", r.label());
    }
    Ok(())
}

fn test_payload(test_args: &[String], exe_timeout: u64) -> String {
    let wrap = if exe_timeout > 0 { format!("timeout {exe_timeout} ") } else { String::new() };
    let args: Vec<String> = test_args.iter().map(sh_quote).collect();
    format!(
        r#"failed=0
count=0
summary=""
for t in /opt/ublk/deps/*; do
    [ -f "$t" ] && [ -x "$t" ] || continue
    count=$((count + 1))
    name=$(basename "$t")
    echo "xtask-guest: ===== $name ====="
    start=$(date +%s)
    {wrap}"$t" --include-ignored --test-threads=1 {args}
    rc=$?
    if [ -n "{wrap}" ] && [ "$rc" -ne 0 ] && [ $(( $(date +%s) - start )) -ge {exe_timeout} ]; then
        echo "xtask-guest: $name TIMED OUT after {exe_timeout} s (killed)"
        rc=124
    fi
    echo "UBLK_VM_TEST $name $rc" > /dev/ttyS1
    summary="$summary  $name: exit $rc
"
    [ "$rc" -eq 0 ] || failed=1
done
echo "xtask-guest: test executables on $(uname -r):"
printf "%s" "$summary"
if [ "$count" -eq 0 ]; then echo "xtask-guest: no test executables found"; exit 1; fi
exit $failed
"#,
        args = args.join(" "),
        wrap = wrap,
        exe_timeout = exe_timeout
    )
}

/// The tests that show a build negotiates from the kernel's answers.
const NEGOTIATION_TESTS: &[&str] = &[
    "negotiation_follows_the_kernel_not_the_build_header",
    "encoding_follows_the_kernel",
    "null_data_path_skips_the_copy_where_the_kernel_allows",
    // The CLI of that build: it names every flag the kernel reports.
    "data_features_names_every_kernel_bit",
    // Its refusals name every flag up to 7.3, whatever the header has.
    "lifecycle_builder_refuses_flags_it_does_not_implement",
];

fn old_header(timeout: u64) -> Result<()> {
    let ks = [kernels::get("6.12")?, kernels::get("newest")?];
    let target = util::workspace_root().join("target").join("vm-bookworm");
    // A handful of quick tests: the unoptimised dev build compiles faster
    // than it runs slower.
    let a = wsbuild::build_for("bookworm", &target, true, "dev")?;
    let args: Vec<String> = NEGOTIATION_TESTS.iter().map(|s| s.to_string()).collect();
    let payload = vm::Payload { script: test_payload(&args, 300), bins: a.bins, tests: a.tests, strip: true };
    let common = vm::build_common(&payload)?;
    let env = [("UBLK_EXPECT_HEADER".to_string(), "6.1".to_string())];
    let mut bad = vec![];
    for k in &ks {
        let r = vm::run(k, &common, Duration::from_secs(timeout), &env)?;
        let c = testlog::counts(&r.console.join("\n"));
        log!("old-header build on {}: {c} ({})", k.name, r.label());
        add_totals(c);
        // Every negotiation test must have run and passed on this kernel.
        if !r.ok() || c.failed > 0 || c.skipped + c.partly > 0 || c.passed < NEGOTIATION_TESTS.len() as u64 {
            bad.push(format!("{} ({c}, {})", k.name, r.label()));
        }
    }
    if !bad.is_empty() {
        bail!("the build against the 6.1 header did not negotiate like the newest one on: {}", bad.join(", "));
    }
    Ok(())
}

fn test_vm(sel: &str, timeout: u64, exe_timeout: u64, test_args: &[String]) -> Result<()> {
    let names = kernels::expand(sel)?;
    // Kernels first (so a download problem shows before the long build).
    let mut ks = vec![];
    for n in &names {
        ks.push(kernels::get(n)?);
    }
    let a = wsbuild::build(true)?;
    let payload = vm::Payload { script: test_payload(test_args, exe_timeout), bins: a.bins, tests: a.tests, strip: true };
    let common = vm::build_common(&payload)?;
    let mut rows = vec![];
    let mut failed = false;
    let mut all = testlog::Counts::default();
    for k in &ks {
        let r = vm::run(k, &common, Duration::from_secs(timeout), &[])?;
        let console = r.console.join("\n");
        let mut c = testlog::counts(&console);
        // An executable that crashed or timed out prints no failure count.
        let bad_exes = r.tests.iter().filter(|(_, c)| *c != 0).count() as u64;
        if !r.ok() && c.failed < bad_exes.max(1) {
            c.failed = bad_exes.max(1);
        }
        all.add(c);
        print_skips(&k.name, &testlog::skips(&console));
        if !r.tests.is_empty() {
            util::print_table(
                &["test executable", "result"],
                &r.tests
                    .iter()
                    .map(|(n, c)| {
                        let what = match c {
                            0 => "ok".to_string(),
                            124 if exe_timeout > 0 => format!("TIMEOUT ({exe_timeout} s)"),
                            c => format!("FAILED (exit {c})"),
                        };
                        vec![n.clone(), what]
                    })
                    .collect::<Vec<_>>(),
            );
        }
        print_slowest(&k.name, &r.console);
        failed |= !r.ok();
        rows.push(vec![
            k.name.clone(),
            r.guest_release.clone().unwrap_or_else(|| k.version.clone()),
            r.label(),
            c.to_string(),
            util::fmt_dur(r.duration),
        ]);
    }
    println!();
    log!("test-vm summary:");
    util::print_table(&["kernel", "version", "result", "tests", "duration"], &rows);
    add_totals(all);
    println!("test-vm: {all}");
    if failed {
        bail!("test-vm failed on at least one kernel");
    }
    Ok(())
}

/// The slowest driver tests of one kernel's run, from the guest's
/// `xtask-test-time: NAME SECONDS` lines (tests/src/lib.rs, `TestTimer`).
fn print_slowest(kernel: &str, console: &[String]) {
    let mut times: Vec<(f64, &str)> = console
        .iter()
        .filter_map(|l| l.split("xtask-test-time: ").nth(1))
        .filter_map(|r| r.rsplit_once(' ').and_then(|(n, t)| Some((t.trim().parse().ok()?, n.trim()))))
        .collect();
    if times.is_empty() {
        return;
    }
    let total: f64 = times.iter().map(|(t, _)| t).sum();
    times.sort_by(|a, b| b.0.total_cmp(&a.0));
    log!("{kernel}: {} driver tests took {total:.0} s; the slowest:", times.len());
    let rows: Vec<Vec<String>> = times.iter().take(12).map(|(t, n)| vec![n.to_string(), format!("{t:.1} s")]).collect();
    util::print_table(&["test", "time"], &rows);
}

/// The skipped tests of one kernel, with the reason each gave.
fn print_skips(kernel: &str, skips: &[testlog::Skip]) {
    if skips.is_empty() {
        return;
    }
    log!("{kernel}: {} tests skipped what this kernel lacks, in whole or in part (counted as such, not as passed):", skips.len());
    let rows: Vec<Vec<String>> =
        skips.iter().map(|s| vec![s.test.clone(), if s.part { "part" } else { "all" }.to_string(), short(&s.why, 110)]).collect();
    util::print_table(&["test", "skipped", "why"], &rows);
}

/// `s` cut to `n` characters (with an ellipsis), for a table.
fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut t: String = s.chars().take(n - 1).collect();
    t.push('…');
    t
}

/// The guest tests' counts of every step of this run, for `ci`'s last line.
static TOTALS: std::sync::Mutex<testlog::Counts> = std::sync::Mutex::new(testlog::Counts { passed: 0, partly: 0, skipped: 0, failed: 0 });

fn add_totals(c: testlog::Counts) {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).add(c);
}

fn demo(kernel: &str, timeout: u64, force_vm: bool) -> Result<()> {
    let script = util::xtask_dir().join("scripts").join("demo.sh");
    if Path::new("/dev/ublk-control").exists() && !force_vm {
        log!("/dev/ublk-control present: running the demo natively");
        util::run(Command::new(util::cargo()).args(["build", "-p", "ublk-cli", "--bins"]).current_dir(workspace_root()))?;
        let target = std::env::var_os("CARGO_TARGET_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
        return util::run(Command::new("sh").arg(&script).env("UBLK_BIN_DIR", target.join("debug")));
    }
    log!("no /dev/ublk-control on this host: running the demo in a VM");
    let name = single_kernel(kernel)?;
    let k = kernels::get(&name)?;
    let a = wsbuild::build(false)?;
    let payload = vm::Payload { script: "sh /opt/ublk/bin/demo.sh\n".into(), bins: a.bins, tests: vec![], strip: true };
    let common = vm::build_common(&payload)?;
    let r = vm::run(&k, &common, Duration::from_secs(timeout), &[])?;
    if !r.ok() {
        bail!("demo on kernel {name}: {}", r.label());
    }
    Ok(())
}

/// The start of an error that says a CI step could not check anything on
/// this machine (reported as SKIPPED in the summary, never as ok).
pub const SKIPPED: &str = "SKIPPED";

fn ci(timeout: u64) -> Result<()> {
    let root = workspace_root();
    let cargo = |args: &[&str]| {
        let mut c = Command::new(util::cargo());
        c.args(args).current_dir(&root);
        c
    };
    type Step<'a> = (&'a str, Box<dyn FnOnce() -> Result<()> + 'a>);
    let steps: Vec<Step> = vec![
        ("cargo fmt --check", Box::new(|| util::run(&mut cargo(&["fmt", "--all", "--check"])))),
        ("headers (bookworm, trixie, sid)", Box::new(|| headers::cmd_headers(None, None))),
        ("host cargo test --workspace", Box::new(|| util::run(&mut cargo(&["test", "--workspace"])))),
        ("clippy -D warnings", Box::new(|| util::run(&mut cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])))),
        ("cargo doc (-Dwarnings)", Box::new(|| util::run(cargo(&["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-Dwarnings")))),
        ("cargo package + publish --dry-run", Box::new(package::check)),
        ("rust-version (MSRV) builds", Box::new(package::msrv)),
        ("kernels --kernel all", Box::new(|| kernels::cmd_kernels("all"))),
        ("test-vm --kernel all", Box::new(move || test_vm("all", timeout, 600, &[]))),
        ("old-header (6.1-header build on 6.12 and newest)", Box::new(|| old_header(600))),
        ("dependent crate runs the doc example (newest)", Box::new(|| dependent::run(600))),
        ("demo", Box::new(|| demo("6.12", 600, false))),
    ];
    let mut rows = vec![];
    let mut failed = vec![];
    let total = Instant::now();
    for (name, f) in steps {
        println!();
        log!("===== CI step: {name} =====");
        let t = Instant::now();
        let r = f();
        let d = t.elapsed();
        let res = match &r {
            Ok(()) => "ok".to_string(),
            Err(e) if format!("{e:#}").starts_with(SKIPPED) => {
                println!("xtask: WARNING: {name}: {e:#}");
                "SKIPPED (not checked, see the warning above)".to_string()
            }
            Err(e) => {
                println!("xtask: ERROR: {name}: {e:#}");
                failed.push(name);
                "FAILED".to_string()
            }
        };
        log!("CI step {name}: {res} ({})", util::fmt_dur(d));
        rows.push(vec![name.to_string(), res, util::fmt_dur(d)]);
    }
    println!();
    log!("CI summary (total {}):", util::fmt_dur(total.elapsed()));
    util::print_table(&["step", "result", "duration"], &rows);
    // The closing line: the guest tests' counts, every failed step a failure.
    let mut t = *TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let other_failed = failed.iter().filter(|n| !(n.starts_with("test-vm") && t.failed > 0)).count() as u64;
    if !failed.is_empty() {
        println!("xtask: ERROR: CI failed: {}", failed.join(", "));
    }
    t.failed += other_failed;
    println!("ci: {t}");
    if !failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
