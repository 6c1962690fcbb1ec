//! The processes field.rs runs beside a device: fio or dd in the
//! background, and `ublk-testsrv`, the misbehaving server.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ublk_tests::{bin, wait_timeout};

/// A background process (fio, dd) with its output in a log file; killed
/// and reaped on drop.
pub struct Bg {
    pub child: Child,
    log: PathBuf,
}

impl Bg {
    pub fn spawn(cmd: &str, args: &[String], name: &str) -> Bg {
        let log = PathBuf::from(format!("/tmp/field-{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
        Bg { child, log }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its exit status within `limit`, else panics naming `what`.
    pub fn wait(&mut self, limit: Duration, what: &str) -> ExitStatus {
        wait_timeout(&mut self.child, limit).unwrap_or_else(|| panic!("{what}: still running after {limit:?}\n{}", self.output()))
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = wait_timeout(&mut self.child, Duration::from_secs(10));
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

pub fn dd(args: &[&str], name: &str) -> Bg {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    v.push("status=none".into());
    Bg::spawn("dd", &v, name)
}

/// A running `ublk-testsrv`, its stdout read line by line; SIGKILLed and
/// reaped on drop.
pub struct TestSrv {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl TestSrv {
    pub fn start(args: &[&str]) -> TestSrv {
        let mut child = Command::new(bin("ublk-testsrv"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn ublk-testsrv: {e}"));
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        TestSrv { child, lines, seen: Vec::new() }
    }

    /// The next line starting with `prefix` (earlier other lines are kept in
    /// `seen`); panics after `limit` or when the server's output ends.
    pub fn expect(&mut self, prefix: &str, limit: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let left = limit.saturating_sub(t0.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(l) => self.seen.push(l),
                Err(e) => panic!("ublk-testsrv: no line {prefix:?} within {limit:?} ({e:?}); seen {:?}", self.seen),
            }
        }
    }

    /// Sends SIGKILL; returns when it was sent (the process is reaped later).
    pub fn kill9(&self) -> Instant {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        Instant::now()
    }

    pub fn reap(&mut self, limit: Duration) -> ExitStatus {
        wait_timeout(&mut self.child, limit).unwrap_or_else(|| panic!("ublk-testsrv did not exit within {limit:?}"))
    }

    /// SIGTERM, then its exit status and the rest of its output.
    pub fn terminate(&mut self, limit: Duration) -> (ExitStatus, Vec<String>) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.reap(limit);
        let mut rest = std::mem::take(&mut self.seen);
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            rest.push(l);
        }
        (st, rest)
    }
}

impl Drop for TestSrv {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = wait_timeout(&mut self.child, Duration::from_secs(20));
        }
    }
}
