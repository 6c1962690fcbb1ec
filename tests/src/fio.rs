//! fio as the tests drive it: verified workloads, their arguments, and
//! following a running job through the device's write count.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{dev_state, nproc, run_ok, wait_timeout, Daemon};

/// fio with crc32c verify of everything it wrote: 2 jobs, each on its own
/// half of `span` bytes of `dev` ([`fio_verify_jobs`]).
pub fn fio_verify_halves(name: &str, dev: &str, span: u64, workload: &[&str]) -> String {
    fio_verify_jobs(name, dev, span / 2, span / 2, workload)
}

/// fio with crc32c verify of everything it wrote: 2 jobs of `size` bytes
/// of `dev`, the second `stride` bytes past the first, pinned one per CPU
/// so both queues serve. `workload` is what differs between callers
/// (`--rw`, block sizes, `--iodepth`). Asserts fio saw no error; prints its
/// IOPS line and returns its output.
pub fn fio_verify_jobs(name: &str, dev: &str, size: u64, stride: u64, workload: &[&str]) -> String {
    let size = size.to_string();
    let stride = stride.to_string();
    let cpus = format!("0-{}", nproc() - 1);
    let name = format!("--name={name}");
    let mut args = vec![name.as_str(), "--filename", dev];
    args.extend_from_slice(workload);
    args.extend_from_slice(&[
        "--ioengine=io_uring",
        "--direct=1",
        "--numjobs=2",
        "--size",
        &size,
        "--offset_increment",
        &stride,
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--cpus_allowed",
        &cpus,
        "--cpus_allowed_policy=split",
        "--group_reporting",
    ]);
    let out = fio_ok(&args);
    let line = out.lines().find(|l| l.contains("IOPS=")).unwrap_or("").trim().to_string();
    eprintln!("fio verify {dev} {workload:?}: {line}");
    out
}

/// Runs fio and asserts it succeeded and every job reports `err= 0`; returns its output.
pub fn fio_ok(args: &[&str]) -> String {
    let out = run_ok("fio", args);
    for l in out.lines().filter(|l| l.contains("err=")) {
        assert!(l.contains("err= 0"), "fio {args:?} reported an error: {l}\n{out}");
    }
    out
}

/// The fio job: 2 jobs of randwrite + crc32c verify on their own 8 MiB
/// halves of [base, base+16M), rate-limited so the write phase lasts ~4 s.
pub fn fio_rate_verify_args(file: &str, base: u64, direct: bool, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--name=rec",
        "--rw=randwrite",
        "--bs=4k",
        "--ioengine=io_uring",
        "--iodepth=32",
        "--numjobs=2",
        "--size=8M",
        "--offset_increment=8M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--rate_iops=500",
        "--group_reporting",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("--filename={file}"));
    v.push(format!("--offset={base}"));
    v.push(format!("--direct={}", u8::from(direct)));
    v.push(format!("--cpus_allowed=0-{}", nproc() - 1));
    v.push("--cpus_allowed_policy=split".into());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Asserts that a `--verify_only` pass of [`fio_rate_verify_args`] read back and checked
/// all 16 MiB (4096 4 KiB blocks, both jobs) without an error. fio's exit
/// status (checked by `run_ok`) covers a failed check; this makes sure the
/// pass did not verify less than everything.
pub fn assert_verified_all(out: &str, what: &str) {
    for l in out.lines().filter(|l| l.contains("err=")) {
        assert!(l.contains("err= 0"), "{what}: fio error: {l}\n{out}");
    }
    let reads = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("issued rwts: total="))
        .and_then(|t| t.split(',').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{what}: no 'issued rwts' line in fio's output:\n{out}"));
    assert_eq!(reads, (16 << 20) / 4096, "{what}: verify_only read {reads} blocks, not all 16 MiB:\n{out}");
}

/// A `--verify_only` pass of [`fio_rate_verify_args`] (at offset 0) over
/// `file`, with O_DIRECT if `direct`: asserts it read back and checked all
/// 16 MiB ([`assert_verified_all`]); `what` names the pass in failures.
pub fn verify_only_all(file: &str, direct: bool, what: &str) {
    let args = fio_rate_verify_args(file, 0, direct, &["--verify_only"]);
    let out = run_ok("fio", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_verified_all(&out, what);
}

/// Waits (up to 180 s) for a [`spawn_fio`] job (output in `log`) that a
/// daemon kill or quiesce interrupted, once the device is served again:
/// fio must succeed and report no error; `across` names what it went
/// through.
pub fn finish_fio(fio: &mut Child, log: &Path, across: &str) {
    let st = wait_timeout(fio, Duration::from_secs(180)).unwrap_or_else(|| {
        let _ = fio.kill();
        panic!("fio did not finish within 180 s of {across}")
    });
    let out = std::fs::read_to_string(log).unwrap_or_default();
    assert!(st.success(), "fio failed across {across} ({st}):\n{out}");
    for l in out.lines().filter(|l| l.contains("err=")) {
        assert!(l.contains("err= 0"), "fio error across {across}: {l}\n{out}");
    }
}

/// Write requests block device `dev` completed so far (/sys/block/ublkbN/stat, field 5).
pub fn writes_completed(dev: &str) -> u64 {
    let name = dev.trim_start_matches("/dev/");
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap_or_default();
    stat.split_whitespace().nth(4).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Waits (up to 60 s: fio starts slowly under TCG) until `n` more writes
/// completed on `dev`, so what the test does next (kill or quiesce the
/// daemon) happens in the middle of fio's job.
pub fn wait_for_writes(dev: &str, n: u64, fio: &mut Child) {
    let t0 = Instant::now();
    let n = writes_completed(dev) + n;
    while writes_completed(dev) < n {
        assert!(fio.try_wait().unwrap().is_none(), "fio exited before it wrote {n} requests to {dev}");
        assert!(t0.elapsed() < Duration::from_secs(60), "fio wrote only {} requests to {dev} in 60 s", writes_completed(dev));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs daemon `d` in the middle of `fio`'s job on its device: once
/// fio completed 200 more writes there ([`wait_for_writes`]), and asserting
/// fio still runs (else its job was too short to cross the kill). Reaps
/// the daemon.
pub fn kill_mid_fio(d: Daemon, fio: &mut Child) {
    wait_for_writes(d.dev.to_str().unwrap(), 200, fio);
    assert!(fio.try_wait().unwrap().is_none(), "fio finished before the daemon was killed: make it longer");
    let id = d.id();
    d.kill();
    eprintln!("daemon of device {id} killed; state {}", dev_state(id));
}

/// Starts fio with `args`, its output to `log`.
pub fn spawn_fio(args: &[String], log: &Path) -> Child {
    Command::new("fio").args(args).stdout(std::fs::File::create(log).unwrap()).stderr(Stdio::inherit()).spawn().expect("spawn fio")
}
