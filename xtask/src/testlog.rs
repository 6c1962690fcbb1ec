//! Reading libtest's output from a guest's console.
//!
//! A driver test that finds the running kernel lacks what it checks prints
//! `skipped: WHY` (tests/src/lib.rs, `skipped`) and returns, so libtest
//! reports it as passed; one that lacks only some of its variants prints
//! `skipped part: WHY` (`skipped_part`) and runs the others. Such tests are
//! counted here as skipped or partly skipped, never as passed: a skip is
//! not a pass.

/// The counts of one or more libtest runs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Passed and skipped nothing.
    pub passed: u64,
    /// Passed, having skipped some of their variants (`skipped part:`).
    pub partly: u64,
    /// Returned after printing `skipped:` (libtest said ok).
    pub skipped: u64,
    pub failed: u64,
}

impl Counts {
    pub fn add(&mut self, o: Counts) {
        self.passed += o.passed;
        self.partly += o.partly;
        self.skipped += o.skipped;
        self.failed += o.failed;
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} passed, {} partly skipped, {} skipped, {} failed", self.passed, self.partly, self.skipped, self.failed)
    }
}

/// One test that printed `skipped:` or `skipped part:` and then passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub test: String,
    /// Only some variants were skipped.
    pub part: bool,
    /// The first reason it gave (of a whole skip, if it gave one).
    pub why: String,
}

/// The header `test_payload`'s guest script prints before each test
/// executable.
const EXE_HEADER: &str = "xtask-guest: ===== ";

/// A console line without a leading kernel timestamp (`[   12.345678] `).
fn strip_stamp(l: &str) -> &str {
    let t = l.trim_start();
    match t.strip_prefix('[').and_then(|r| r.split_once(']')) {
        Some((stamp, rest)) if stamp.trim().parse::<f64>().is_ok() => rest.trim_start(),
        _ => t,
    }
}

/// `out` cut into one piece per test executable (the whole of it if it
/// has no headers).
fn executables(out: &str) -> Vec<&str> {
    let mut v = vec![];
    let mut rest = out;
    while let Some(i) = rest.find(EXE_HEADER) {
        v.push(&rest[..i]);
        rest = &rest[i + EXE_HEADER.len()..];
    }
    v.push(rest);
    v
}

/// The totals of every `test result:` line in `out`, less the tests that
/// printed `skipped:` or `skipped part:` and passed, which are counted as
/// skipped or partly skipped.
pub fn counts(out: &str) -> Counts {
    let (mut passed, mut failed) = (0, 0);
    for l in out.lines() {
        // Anywhere in the line: a guest's console may prefix kernel messages.
        let Some(rest) = l.split("test result:").nth(1) else {
            continue;
        };
        for part in rest.split(';') {
            let part = part.trim().trim_start_matches("ok.").trim_start_matches("FAILED.").trim();
            let mut it = part.split_whitespace();
            if let (Some(n), Some(what)) = (it.next(), it.next()) {
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    _ => {}
                }
            }
        }
    }
    let s = skips(out);
    let partly = s.iter().filter(|s| s.part).count() as u64;
    let skipped = s.len() as u64 - partly;
    Counts { passed: passed.saturating_sub(partly + skipped), partly, skipped, failed }
}

/// The tests that printed `skipped:` or `skipped part:` and then passed,
/// in order, each once per executable. Only executables that reached
/// their `test result:` line count (one that crashed reports no passes to
/// take them from).
///
/// With `--test-threads=1` libtest prints `test NAME ... `, the test's own
/// stderr, then `ok` or `FAILED` (on the same line when the test printed
/// nothing).
pub fn skips(out: &str) -> Vec<Skip> {
    let mut all = vec![];
    for exe in executables(out) {
        if !exe.contains("test result:") {
            continue;
        }
        let mut done: Vec<Skip> = vec![];
        // The running test, and what it skipped so far.
        let mut current: Option<(String, Option<Skip>)> = None;
        for l in exe.lines() {
            let mut rest = strip_stamp(l);
            if let Some((name, after)) = rest.strip_prefix("test ").and_then(|s| s.split_once(" ... ")) {
                current = Some((name.trim().to_string(), None));
                rest = after;
            }
            let Some((name, skip)) = current.as_mut() else {
                continue;
            };
            if let Some(w) = rest.strip_prefix("skipped: ") {
                // A whole skip wins over a part: the test said it ran nothing.
                if skip.as_ref().is_none_or(|s| s.part) {
                    *skip = Some(Skip { test: name.clone(), part: false, why: w.trim().to_string() });
                }
                continue;
            }
            if let Some(w) = rest.strip_prefix("skipped part: ") {
                skip.get_or_insert_with(|| Skip { test: name.clone(), part: true, why: w.trim().to_string() });
                continue;
            }
            let word = rest.split_whitespace().next().unwrap_or("");
            match word {
                "ok" => {
                    if let Some(s) = skip.take() {
                        if !done.iter().any(|d| d.test == s.test) {
                            done.push(s);
                        }
                    }
                    current = None;
                }
                "FAILED" | "ignored" | "ignored," => current = None,
                _ => {}
            }
        }
        all.extend(done);
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
xtask-guest: ===== batch-356a7a1400c1c9e7 =====

running 5 tests
test batch_del_under_fio_leaves_nothing ... skipped: UBLK_F_BATCH_IO needs Linux 7.0+ (kernel 6.1.187)
xtask-test-time: batch_del_under_fio_leaves_nothing 0.0
ok
test plain ... ok
test loops ... skipped part: --fail-io needs 6.13 (kernel 6.1.187)
[   12.345678] ublkb0: detected capacity change
checking test device ... done
skipped part: --fail-io needs 6.13 again (kernel 6.1.187)
ok
test both ... skipped part: a (kernel 6.1.187)
skipped: all of it (kernel 6.1.187)
[   13.000001] ok
test broken ... skipped: part (kernel 6.1.187)
FAILED

test result: FAILED. 4 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.22s
";

    #[test]
    fn a_skip_is_not_a_pass() {
        let s = skips(LOG);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].test, "batch_del_under_fio_leaves_nothing");
        assert_eq!(s[0].why, "UBLK_F_BATCH_IO needs Linux 7.0+ (kernel 6.1.187)");
        assert!(!s[0].part);
        assert_eq!((s[1].test.as_str(), s[1].part), ("loops", true));
        assert_eq!(s[1].why, "--fail-io needs 6.13 (kernel 6.1.187)");
        assert_eq!((s[2].test.as_str(), s[2].part, s[2].why.as_str()), ("both", false, "all of it (kernel 6.1.187)"));
        assert_eq!(counts(LOG), Counts { passed: 1, partly: 1, skipped: 2, failed: 1 });
    }

    #[test]
    fn totals_add_up_over_several_executables() {
        let two = format!(
            "{LOG}xtask-guest: ===== other =====\nrunning 1 test\ntest x ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored\n"
        );
        assert_eq!(counts(&two), Counts { passed: 2, partly: 1, skipped: 2, failed: 1 });
        assert_eq!(counts("test result: ok. 0 passed; 0 failed;"), Counts::default());
    }

    /// An executable that crashed has no `test result:` line: its skips
    /// are not taken from another one's passes.
    #[test]
    fn a_crashed_executable_takes_nothing_from_the_others() {
        let log = "xtask-guest: ===== a =====\ntest s ... skipped: x (kernel 6.1)\nok\nSegmentation fault\n\
                   xtask-guest: ===== b =====\ntest c ... ok\ntest result: ok. 1 passed; 0 failed;\n";
        assert_eq!(counts(log), Counts { passed: 1, partly: 0, skipped: 0, failed: 0 });
    }
}
