//! Small helpers: logging, running commands, paths, hashing.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// When set, progress lines go to stderr (for commands whose stdout is data).
pub static LOG_TO_STDERR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn emit(line: &str) {
    if LOG_TO_STDERR.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("{line}");
    } else {
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
}

#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::util::emit(&format!("xtask: {}", format!($($arg)*)))
    };
}

#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => {
        $crate::util::emit(&format!("xtask: WARNING: {}", format!($($arg)*)))
    };
}

/// Root of the workspace (parent of the xtask crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent dir").to_path_buf()
}

pub fn xtask_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// `$UBLK_CACHE_DIR` or `$HOME/.cache/ublk-rs`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("UBLK_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("ublk-rs")
}

pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run a command with inherited stdio; error unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    log!("$ {}", describe(cmd));
    let st = cmd.status().with_context(|| format!("failed to spawn {}", describe(cmd)))?;
    if !st.success() {
        bail!("command failed ({}): {}", st, describe(cmd));
    }
    Ok(())
}

/// Run a command quietly; error (with its stderr) unless it exits 0. Returns stdout.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("failed to spawn {}", describe(cmd)))?;
    if !out.status.success() {
        bail!("command failed ({}): {}\n{}", out.status, describe(cmd), String::from_utf8_lossy(&out.stderr).trim_end());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run a command, streaming its stdout to ours while also capturing it.
/// Returns (success, captured stdout).
pub fn run_tee(cmd: &mut Command) -> Result<(bool, String)> {
    log!("$ {}", describe(cmd));
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("failed to spawn {}", describe(cmd)))?;
    let mut pipe = child.stdout.take().unwrap();
    let mut captured = Vec::new();
    let mut buf = [0u8; 8192];
    let stdout = std::io::stdout();
    loop {
        let n = pipe.read(&mut buf)?;
        if n == 0 {
            break;
        }
        captured.extend_from_slice(&buf[..n]);
        let mut lock = stdout.lock();
        lock.write_all(&buf[..n])?;
        lock.flush()?;
    }
    let st = child.wait()?;
    Ok((st.success(), String::from_utf8_lossy(&captured).into_owned()))
}

pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path).chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().map(PathBuf::from)) {
        let p = dir.join(prog);
        if p.is_file() {
            return Some(p);
        }
    }
    None
}

/// sha256 hex digest of some bytes (via sha256sum).
pub fn sha256_hex(data: &[u8]) -> Result<String> {
    let mut child = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().context("spawn sha256sum")?;
    child.stdin.take().unwrap().write_all(data)?;
    let out = child.wait_with_output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    Ok(s.split_whitespace().next().unwrap_or_default().to_string())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let out = output(Command::new("sha256sum").arg(path))?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_string())
}

pub fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s as u64) % 60)
    } else {
        format!("{:.1}s", s)
    }
}

/// Print a simple left-aligned table.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<width$}  ", c, width = w[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.iter().map(|s| s.to_string()).collect());
    line(w.iter().map(|n| "-".repeat(*n)).collect());
    for r in rows {
        line(r.clone());
    }
    let _ = std::io::stdout().flush();
}

/// Shell-quote one argument with single quotes.
pub fn sh_quote<S: AsRef<OsStr>>(s: S) -> String {
    let s = s.as_ref().to_string_lossy();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        return s.into_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Compare two Debian version strings (dpkg semantics).
pub fn deb_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if e.chars().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), r),
            _ => (0, v),
        };
        match rest.rfind('-') {
            Some(i) => (epoch, &rest[..i], &rest[i + 1..]),
            None => (epoch, rest, ""),
        }
    }
    fn order(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(b'~') => -1,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(c) => c as i32 + 256,
        }
    }
    fn cmp_part(a: &str, b: &str) -> std::cmp::Ordering {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            // non-digit prefix
            loop {
                let ca = a.get(i).copied().filter(|c| !c.is_ascii_digit());
                let cb = b.get(j).copied().filter(|c| !c.is_ascii_digit());
                if ca.is_none() && cb.is_none() {
                    break;
                }
                let (oa, ob) = (order(ca), order(cb));
                if oa != ob {
                    return oa.cmp(&ob);
                }
                if ca.is_some() {
                    i += 1;
                }
                if cb.is_some() {
                    j += 1;
                }
            }
            let si = i;
            while i < a.len() && a[i].is_ascii_digit() {
                i += 1;
            }
            let sj = j;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            let na: u128 = std::str::from_utf8(&a[si..i]).unwrap().parse().unwrap_or(0);
            let nb: u128 = std::str::from_utf8(&b[sj..j]).unwrap().parse().unwrap_or(0);
            if na != nb {
                return na.cmp(&nb);
            }
        }
        std::cmp::Ordering::Equal
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb).then_with(|| cmp_part(ua, ub)).then_with(|| cmp_part(ra, rb))
}

#[cfg(test)]
mod tests {
    use super::deb_cmp;
    use std::cmp::Ordering::*;
    #[test]
    fn versions() {
        assert_eq!(deb_cmp("7.3.4-1~bpo13+1", "7.3~rc7-1~exp1"), Greater);
        assert_eq!(deb_cmp("7.3~rc7-1~exp1", "7.2.13-1"), Greater);
        assert_eq!(deb_cmp("6.12.117-1", "6.12.107-1"), Greater);
        assert_eq!(deb_cmp("1.0", "1.0-1"), Less);
        assert_eq!(deb_cmp("1:0.1", "9.9"), Greater);
        assert_eq!(deb_cmp("6.1.192-2", "6.1.192-2"), Equal);
    }
}
