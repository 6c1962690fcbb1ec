//! `cargo xtask bench`: fio against the kernel's null_blk (the upper bound),
//! our ublk-null and libublk's null target in its sync and async styles, in
//! one VM boot per kernel. Targets are interleaved run by run; the guest side
//! is scripts/bench.sh. Prints medians, spreads and ratios; writes JSON.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{kernels, log, util, vm, wsbuild};

#[derive(Default)]
struct Record {
    kernel: String,
    target: String,
    queues: u32,
    fio_jobs: u32,
    job: String,
    iops: Vec<f64>,
    /// Busy CPUs (average over the fio run) per run; empty in old records.
    cpu: Vec<f64>,
    /// Of those, the server process's in user mode, in the kernel, and the
    /// NBD server's, per run; empty where there is no such process (and in
    /// old records).
    srv_user: Vec<f64>,
    srv_sys: Vec<f64>,
    peer: Vec<f64>,
    /// Measured under `--icount` (instructions counted).
    icount: bool,
}

impl Record {
    /// CPU time per I/O in microseconds: fio, kernel and server together.
    /// Free-running, median busy CPUs over median IOPS. Under `--icount`
    /// the vCPUs take turns and the guest's clock counts the instructions
    /// of whichever runs, so a second of it is a second of one CPU's work
    /// and the CPU time per I/O is the time per I/O, 1 / IOPS (busy CPUs
    /// would count a vCPU waiting for its turn as busy). That includes any
    /// time with every vCPU idle, which the jobs at queue depth 64 barely
    /// leave.
    fn cpu_us_per_io(&self) -> Option<f64> {
        let (c, i) = (median(&self.cpu), median(&self.iops));
        if self.icount {
            return (i > 0.0).then(|| 1e6 / i);
        }
        (c > 0.0 && i > 0.0).then(|| c * 1e6 / i)
    }

    /// "1.98 CPU, 16.5 µs" for the CPU table.
    fn cpu_cell(&self) -> String {
        match self.cpu_us_per_io() {
            Some(us) => format!("{:.2} CPU, {us:.1} µs", median(&self.cpu)),
            None => "-".into(),
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        return 0.0;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    (v.iter().cloned().fold(f64::MAX, f64::min), v.iter().cloned().fold(0.0, f64::max))
}

/// The records grouped as the tables' rows: (kernel version for sorting,
/// kernel, queues, fio jobs, job) -> target -> record, in row order.
type Groups<'a> = BTreeMap<(Vec<u32>, String, u32, u32, String), BTreeMap<&'a str, &'a Record>>;

fn groups(records: &[Record]) -> Groups<'_> {
    let ver = |k: &str| k.split(|c: char| !c.is_ascii_digit()).map(|x| x.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    let mut groups = Groups::new();
    for r in records {
        groups.entry((ver(&r.kernel), r.kernel.clone(), r.queues, r.fio_jobs, r.job.clone())).or_default().insert(&r.target, r);
    }
    groups
}

/// A row's median IOPS of `target` (0 where it did not run).
fn med_iops(t: &BTreeMap<&str, &Record>, target: &str) -> f64 {
    t.get(target).map(|r| median(&r.iops)).unwrap_or(0.0)
}

/// libublk's best mode in a row: the one with the higher median IOPS.
fn libublk_best<'a>(t: &BTreeMap<&str, &'a Record>) -> Option<&'a Record> {
    let (s, a) = (t.get("libublk-sync").copied(), t.get("libublk-async").copied());
    match (s, a) {
        (Some(s), Some(a)) => Some(if median(&a.iops) > median(&s.iops) { a } else { s }),
        (s, a) => s.or(a),
    }
}

/// The summary both tables print: the targets in column order (null_blk,
/// ours and its variants, libublk), and one row per kernel (in version
/// order), queue count, fio jobs and job: kernel, `config(queues, jobs)`,
/// job, each target's `cell` ("-" where it did not run), then ours /
/// null_blk and ours / libublk's best mode (ratios of medians).
fn summary(records: &[Record], config: impl Fn(u32, u32) -> String, cell: impl Fn(&Record) -> String) -> (Vec<String>, Vec<Vec<String>>) {
    let mut targets: Vec<String> = records.iter().map(|r| r.target.clone()).collect();
    targets.sort_by_key(|t| target_rank(t));
    targets.dedup();
    let extra = extra_ratios(&targets);
    let ratio = |a: f64, b: f64| if a > 0.0 && b > 0.0 { format!("{:.2}", a / b) } else { "-".into() };
    let rows = groups(records)
        .iter()
        .map(|((_, kernel, q, fj, job), t)| {
            let mut row = vec![kernel.clone(), config(*q, *fj), job.clone()];
            row.extend(targets.iter().map(|n| match t.get(n.as_str()) {
                Some(r) if !r.iops.is_empty() => cell(r),
                _ => "-".into(),
            }));
            let ours = med_iops(t, "ublk-null");
            row.push(ratio(ours, med_iops(t, "null_blk")));
            row.push(ratio(ours, libublk_best(t).map(|r| median(&r.iops)).unwrap_or(0.0)));
            for (_, a, b) in &extra {
                row.push(ratio(med_iops(t, a), med_iops(t, b)));
            }
            row
        })
        .collect();
    (targets, rows)
}

/// Ratios of IOPS between variants, as columns after ours/null_blk and
/// ours/libublk: (heading, numerator, denominator), where both ran.
const EXTRA_RATIOS: [(&str, &str, &str); 14] = [
    ("twin / ublk-null", "ublk-null+twin", "ublk-null"),
    ("async / sync null", "ublk-null+async", "ublk-null"),
    ("batch / no batch", "ublk-null+batch", "ublk-null+nobatch"),
    ("loop user-copy / copy", "ublk-loop+user-copy", "ublk-loop+copy"),
    ("loop zero-copy / copy", "ublk-loop+zero-copy", "ublk-loop+copy"),
    ("loop auto-buf-reg / copy", "ublk-loop+auto-buf-reg", "ublk-loop+copy"),
    ("nbd: ours / nbd.ko", "ublk-nbd", "nbd.ko"),
    ("nbd: simple / structured", "ublk-nbd+simple", "ublk-nbd"),
    ("nbd: ours zero-copy / nbd.ko", "ublk-nbd+zero-copy", "nbd.ko"),
    ("nbd: ours auto-buf-reg / nbd.ko", "ublk-nbd+auto-buf-reg", "nbd.ko"),
    ("ramdisk / brd", "ublk-ramdisk", "brd"),
    ("ramdisk user-copy / brd", "ublk-ramdisk+user-copy", "brd"),
    ("loop auto-buf-reg / kernel loop", "ublk-loop+auto-buf-reg", "kloop"),
    ("loop zero-copy / kernel loop", "ublk-loop+zero-copy", "kloop"),
];

fn extra_ratios(targets: &[String]) -> Vec<(&'static str, &'static str, &'static str)> {
    EXTRA_RATIOS.iter().copied().filter(|(_, a, b)| targets.iter().any(|t| t == a) && targets.iter().any(|t| t == b)).collect()
}

/// The headings of the ratio columns [`summary`] appends.
fn ratio_heads(targets: &[String]) -> Vec<String> {
    let mut v = vec!["ours/null_blk".to_string(), "ours/libublk best".to_string()];
    v.extend(extra_ratios(targets).iter().map(|(h, _, _)| h.to_string()));
    v
}

/// One row of the tables as numbers, for the picture: medians of ours
/// (`ublk-null`), null_blk and libublk's best mode. IOPS are 0 and CPU
/// times None where a target did not run or has no CPU samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub kernel: String,
    pub queues: u32,
    pub fio_jobs: u32,
    pub job: String,
    pub iops_ours: f64,
    pub iops_null_blk: f64,
    pub iops_libublk: f64,
    /// CPU time per I/O in microseconds.
    pub cpu_ours: Option<f64>,
    pub cpu_null_blk: Option<f64>,
    pub cpu_libublk: Option<f64>,
}

/// The tables' rows, in their order, as [`Point`]s.
fn points(records: &[Record]) -> Vec<Point> {
    groups(records)
        .iter()
        .map(|((_, kernel, q, fj, job), t)| {
            let best = libublk_best(t);
            let cpu = |n: &str| t.get(n).and_then(|r| r.cpu_us_per_io());
            Point {
                kernel: kernel.clone(),
                queues: *q,
                fio_jobs: *fj,
                job: job.clone(),
                iops_ours: med_iops(t, "ublk-null"),
                iops_null_blk: med_iops(t, "null_blk"),
                iops_libublk: best.map(|r| median(&r.iops)).unwrap_or(0.0),
                cpu_ours: cpu("ublk-null"),
                cpu_null_blk: cpu("null_blk"),
                cpu_libublk: best.and_then(Record::cpu_us_per_io),
            }
        })
        .collect()
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// What to run (None: everything).
pub struct Selection {
    pub targets: Option<String>,
    pub jobs: Option<String>,
    pub configs: Option<String>,
}

/// Column order: null_blk, ours and its variants, then libublk.
fn target_rank(t: &str) -> (u8, String) {
    let r = match t {
        "null_blk" => 0,
        "ublk-null" => 1,
        _ if t.starts_with("ublk-null") => 2,
        _ => 3,
    };
    (r, t.to_string())
}

pub fn bench(sel: &str, runs: u32, runtime: u32, json: Option<&Path>, timeout: u64, what: &Selection) -> Result<()> {
    let names = kernels::expand(sel)?;
    let mut ks = vec![];
    for n in &names {
        ks.push(kernels::get(n)?);
    }
    let icount = vm::vm_icount();
    let bins = wsbuild::build_bench()?;
    let payload = vm::Payload {
        script: {
            let mut env = format!("BENCH_RUNS={runs} BENCH_RUNTIME={runtime}");
            // Profiling (scripts/bench.sh): BENCH_PERF=1, and the sample
            // rate, the report's cut-off and length.
            for k in ["BENCH_PERF", "BENCH_PERF_HZ", "BENCH_PERF_MIN", "BENCH_PERF_LINES", "BENCH_PERF_SORT"] {
                if let Ok(v) = std::env::var(k) {
                    env.push_str(&format!(" {k}='{v}'"));
                }
            }
            for (k, v) in [("BENCH_TARGETS", &what.targets), ("BENCH_JOBS", &what.jobs), ("BENCH_CONFIGS", &what.configs)] {
                if let Some(v) = v {
                    env.push_str(&format!(" {k}='{v}'"));
                }
            }
            format!("{env} sh /opt/ublk/bin/bench.sh\n")
        },
        bins,
        tests: vec![],
        strip: true,
    };
    let common = vm::build_common(&payload)?;
    let mut records: Vec<Record> = vec![];
    let mut meta = vec![];
    let mut cmds: BTreeMap<String, String> = BTreeMap::new();
    for k in &ks {
        let r = vm::run(k, &common, Duration::from_secs(timeout), &[])?;
        if !r.ok() {
            bail!("bench VM on kernel {}: {}", k.name, r.label());
        }
        let rel = r.guest_release.clone().unwrap_or_else(|| k.version.clone());
        // (target, queues, fio jobs, job) -> its record, a value per run
        let mut map: BTreeMap<(String, u32, u32, String), Record> = BTreeMap::new();
        for l in &r.console {
            if let Some(rest) = l.split("UBLK_BENCH_META ").nth(1) {
                meta.push(format!("{}: {rest}", k.name));
            } else if let Some(rest) = l.split("UBLK_BENCH_CMD ").nth(1) {
                if let (Some(job), Some(fj), Some(cmd)) = (field(rest, "job"), field(rest, "fio_jobs"), rest.split("cmd=").nth(1)) {
                    let cmd = ["/dev/nullb0", "/dev/ublkb0", "/dev/nbd0"].iter().fold(cmd.to_string(), |c, d| c.replace(d, "DEV"));
                    cmds.insert(format!("{job} x{fj}"), cmd);
                }
            } else if let Some(rest) = l.split("UBLK_BENCH ").nth(1) {
                let (Some(t), Some(q), Some(fj), Some(job), Some(iops)) =
                    (field(rest, "target"), field(rest, "queues"), field(rest, "fio_jobs"), field(rest, "job"), field(rest, "iops"))
                else {
                    continue;
                };
                let (queues, fio_jobs) = (q.parse().unwrap_or(0), fj.parse().unwrap_or(0));
                let e = map.entry((t.to_string(), queues, fio_jobs, job.to_string())).or_insert_with(|| Record {
                    kernel: rel.clone(),
                    target: t.to_string(),
                    queues,
                    fio_jobs,
                    job: job.to_string(),
                    icount: icount.is_some(),
                    ..Record::default()
                });
                e.iops.push(iops.parse().unwrap_or(0.0));
                for (key, v) in [("cpu", &mut e.cpu), ("srv_user", &mut e.srv_user), ("srv_sys", &mut e.srv_sys), ("peer", &mut e.peer)] {
                    if let Some(c) = field(rest, key).and_then(|c| c.parse().ok()) {
                        v.push(c);
                    }
                }
            }
        }
        records.extend(map.into_values());
    }
    if records.is_empty() {
        bail!("the bench produced no measurements");
    }
    let clock = match icount {
        Some(shift) => {
            meta.push(format!("qemu: -icount shift={shift},sleep=off (instructions counted; vCPUs take turns on one host thread)"));
            format!(", icount shift={shift}")
        }
        None => String::new(),
    };
    let (targets, rows) = summary(
        &records,
        |q, fj| format!("{q}q/{fj}j"),
        |r| {
            let m = median(&r.iops);
            let (lo, hi) = min_max(&r.iops);
            let spread = if m > 0.0 { (hi - lo) / m * 100.0 } else { 0.0 };
            // Below 10k (an NBD export in TCG) in plain IOPS, not 0.2k.
            if m < 10_000.0 {
                format!("{m:.0} ±{:.0}%", spread / 2.0)
            } else {
                format!("{:.1}k ±{:.0}%", m / 1000.0, spread / 2.0)
            }
        },
    );
    println!();
    log!("bench: IOPS median ±half-spread over {runs} runs of {runtime} s (TCG VM, {} vCPUs{clock})", vm::vm_cpus());
    let mut head: Vec<&str> = vec!["kernel", "queues/jobs", "job"];
    head.extend(targets.iter().map(|t| if t == "ublk-null" { "ublk-null (ours)" } else { t.as_str() }));
    let ratios = ratio_heads(&targets);
    head.extend(ratios.iter().map(String::as_str));
    util::print_table(&head, &rows);
    let (_, rows) = cpu_summary(&records, |q, fj| format!("{q}q/{fj}j"));
    println!();
    log!("bench: CPUs busy while fio ran and CPU time per I/O (fio, kernel and server together; {})", cpu_basis(icount.is_some()));
    head.truncate(head.len() - ratios.len());
    head.extend(cpu_ratios(&targets).iter().map(|(h, _, _)| *h));
    util::print_table(&head, &rows);
    for m in &meta {
        println!("  {m}");
    }
    if let Some(path) = json {
        let recs: Vec<String> = records
            .iter()
            .map(|r| {
                let list = |v: &[f64]| v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(",");
                // The CPU split, where measured.
                let split: String = [("srv_user", &r.srv_user), ("srv_sys", &r.srv_sys), ("peer", &r.peer)]
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| format!(",\"{k}\":[{}]", list(v)))
                    .collect();
                format!(
                    "{{\"kernel\":{},\"target\":{},\"queues\":{},\"job\":{},\"fio_jobs\":{},\"iops\":[{}],\"iops_median\":{},\"cpu\":[{}]{split}}}",
                    json_str(&r.kernel),
                    json_str(&r.target),
                    r.queues,
                    json_str(&r.job),
                    r.fio_jobs,
                    list(&r.iops),
                    median(&r.iops),
                    list(&r.cpu)
                )
            })
            .collect();
        let meta_j: Vec<String> = meta.iter().map(|m| json_str(m)).collect();
        let cmds_j: Vec<String> = cmds.iter().map(|(k, v)| format!("{}:{}", json_str(k), json_str(v))).collect();
        let doc = format!("{{\"records\":[{}],\"meta\":[{}],\"commands\":{{{}}}}}\n", recs.join(",\n"), meta_j.join(","), cmds_j.join(","));
        std::fs::write(path, doc)?;
        log!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// A JSON array of numbers (empty if absent).
fn nums(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default()
}

/// The records of a `bench --json` file (kernel names without their `+`
/// suffix).
fn parse(text: &str) -> Result<Vec<Record>> {
    let doc: serde_json::Value = serde_json::from_str(text)?;
    let Some(recs) = doc["records"].as_array() else { bail!("no records") };
    let icount = doc["meta"].as_array().is_some_and(|m| m.iter().any(|x| x.as_str().is_some_and(|s| s.contains("-icount"))));
    let mut records = vec![];
    for r in recs {
        records.push(Record {
            kernel: r["kernel"].as_str().unwrap_or("").split('+').next().unwrap_or("").to_string(),
            target: r["target"].as_str().unwrap_or("").to_string(),
            queues: r["queues"].as_u64().unwrap_or(0) as u32,
            fio_jobs: r["fio_jobs"].as_u64().unwrap_or(0) as u32,
            job: r["job"].as_str().unwrap_or("").to_string(),
            iops: nums(&r["iops"]),
            cpu: nums(&r["cpu"]),
            srv_user: nums(&r["srv_user"]),
            srv_sys: nums(&r["srv_sys"]),
            peer: nums(&r["peer"]),
            icount,
        });
    }
    Ok(records)
}

/// The rows of a `bench --json` file's tables as numbers (the picture's data).
#[cfg(test)]
pub fn points_from_json(text: &str) -> Result<Vec<Point>> {
    Ok(points(&parse(text)?))
}

/// The README's table from a `bench --json` file: per kernel, queue count,
/// fio jobs and job, each target's median with min–max, and our ratios.
/// With `svg`, also draws them there ([`crate::benchsvg`]).
pub fn markdown(file: &Path, svg: Option<&Path>) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let records = parse(&text).with_context(|| format!("{}", file.display()))?;
    if let Some(out) = svg {
        let title = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        std::fs::write(out, crate::benchsvg::render(&points(&records), &title)?).with_context(|| format!("writing {}", out.display()))?;
        // stdout is the tables.
        util::LOG_TO_STDERR.store(true, std::sync::atomic::Ordering::Relaxed);
        log!("bench-table: wrote {}", out.display());
    }
    let small = records.iter().all(|r| median(&r.iops) < 10_000.0);
    let k = |x: f64| if small { format!("{x:.0}") } else { format!("{:.1}k", x / 1000.0) };
    let (targets, rows) = summary(
        &records,
        |q, fj| format!("{q} / {fj}"),
        |r| {
            let (lo, hi) = min_max(&r.iops);
            format!("{} ({}–{})", k(median(&r.iops)), k(lo).trim_end_matches('k'), k(hi))
        },
    );
    let mut head = vec!["kernel".to_string(), "queues / fio jobs".into(), "job".into()];
    head.extend(targets.iter().map(|t| if t == "ublk-null" { "**ublk-null (ours)**".to_string() } else { t.clone() }));
    let ratios = ratio_heads(&targets);
    head.extend(ratios.iter().map(|h| h.replace('/', " / ").replace("  ", " ")));
    print_markdown(&head, &rows);
    if records.iter().any(|r| !r.cpu.is_empty()) {
        let (_, rows) = cpu_summary(&records, |q, fj| format!("{q} / {fj}"));
        head.truncate(head.len() - ratios.len());
        head.extend(cpu_ratios(&targets).iter().map(|(h, _, _)| h.to_string()));
        println!(
            "\nCPUs busy while fio ran, and CPU time per I/O (fio, kernel and server together; {}):\n",
            cpu_basis(records.iter().any(|r| r.icount))
        );
        print_markdown(&head, &rows);
    }
    Ok(())
}

/// What the CPU time per I/O is made of, for the CPU table's heading.
fn cpu_basis(icount: bool) -> &'static str {
    if icount {
        "instructions counted: the guest's time per I/O, every vCPU's work one at a time, busy polling included"
    } else {
        "busy CPUs over IOPS, medians; a busy-polling server counts as busy"
    }
}

fn print_markdown(head: &[String], rows: &[Vec<String>]) {
    println!("| {} |", head.join(" | "));
    println!("|{}", "---|".repeat(head.len()));
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
}

/// The CPU table: the same rows as [`summary`], each target's busy CPUs and
/// CPU time per I/O, no IOPS ratio columns; the [`CPU_RATIOS`] where both
/// targets ran.
fn cpu_summary(records: &[Record], config: impl Fn(u32, u32) -> String) -> (Vec<String>, Vec<Vec<String>>) {
    let (targets, mut rows) = summary(records, config, Record::cpu_cell);
    let n = ratio_heads(&targets).len();
    let cpu_ratios = cpu_ratios(&targets);
    for (r, (_, t)) in rows.iter_mut().zip(groups(records)) {
        r.truncate(r.len() - n);
        for (_, a, b) in &cpu_ratios {
            let us = |n: &str| t.get(n).and_then(|r| r.cpu_us_per_io());
            r.push(match (us(a), us(b)) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "-".into(),
            });
        }
    }
    (targets, rows)
}

/// Ratios of CPU time per I/O, as columns of the CPU table: (heading,
/// numerator, denominator), where both ran.
const CPU_RATIOS: [(&str, &str, &str); 8] = [
    ("nbd CPU/IO: ours / nbd.ko", "ublk-nbd", "nbd.ko"),
    ("nbd CPU/IO: zero-copy / nbd.ko", "ublk-nbd+zero-copy", "nbd.ko"),
    ("nbd CPU/IO: auto-buf-reg / nbd.ko", "ublk-nbd+auto-buf-reg", "nbd.ko"),
    ("batch CPU/IO: / no batch", "ublk-null+batch", "ublk-null+nobatch"),
    ("null CPU/IO: ours / null_blk", "ublk-null", "null_blk"),
    ("loop CPU/IO: zero-copy / copy", "ublk-loop+zero-copy", "ublk-loop+copy"),
    ("loop CPU/IO: auto-buf-reg / copy", "ublk-loop+auto-buf-reg", "ublk-loop+copy"),
    ("ramdisk CPU/IO: / brd", "ublk-ramdisk", "brd"),
];

fn cpu_ratios(targets: &[String]) -> Vec<(&'static str, &'static str, &'static str)> {
    CPU_RATIOS.iter().copied().filter(|(_, a, b)| targets.iter().any(|t| t == a) && targets.iter().any(|t| t == b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under `--icount` (named in the file's meta) the CPU time per I/O is
    /// the time per I/O, whatever the busy CPUs; free-running, busy CPUs
    /// over IOPS.
    #[test]
    fn icount_cpu_time_per_io_is_the_time_per_io() {
        let rec = r#"{"kernel":"7.3.4","target":"null_blk","queues":2,"job":"randread-4k-qd64","fio_jobs":2,"iops":[100000,100000],"iops_median":100000,"cpu":[1.9,1.9]}"#;
        let free = format!(r#"{{"records":[{rec}],"meta":["newest: fio"],"commands":{{}}}}"#);
        let counted = format!(r#"{{"records":[{rec}],"meta":["newest: fio","qemu: -icount shift=0,sleep=off"],"commands":{{}}}}"#);
        let us = |t: &str| parse(t).unwrap()[0].cpu_us_per_io().unwrap();
        assert!((us(&free) - 19.0).abs() < 1e-9, "{}", us(&free));
        assert!((us(&counted) - 10.0).abs() < 1e-9, "{}", us(&counted));
    }
}
