//! Reading libtest's output from a guest's console.
//!
//! A driver test that finds the running kernel lacks what it checks prints
//! `skipped: WHY` (tests/src/lib.rs, `skipped`) and returns, so libtest
//! reports it as passed. Those tests are counted here as skipped, never as
//! passed: a skip is not a pass.

/// The counts of one or more libtest runs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Passed and skipped nothing.
    pub passed: u64,
    /// Returned after printing `skipped:` (libtest said ok).
    pub skipped: u64,
    pub failed: u64,
}

impl Counts {
    pub fn add(&mut self, o: Counts) {
        self.passed += o.passed;
        self.skipped += o.skipped;
        self.failed += o.failed;
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} passed, {} skipped, {} failed", self.passed, self.skipped, self.failed)
    }
}

/// One test that printed `skipped:` and then passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub test: String,
    pub why: String,
}

/// The totals of every `test result:` line in `out`, less the tests that
/// printed `skipped:` and passed, which are counted as skipped.
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
    let skipped = skips(out).len() as u64;
    Counts { passed: passed.saturating_sub(skipped), skipped, failed }
}

/// The tests that printed `skipped:` and then passed, in order, each once
/// (with the first reason it gave).
///
/// With `--test-threads=1` libtest prints `test NAME ... `, the test's own
/// stderr, then `ok` or `FAILED` (on the same line when the test printed
/// nothing).
pub fn skips(out: &str) -> Vec<Skip> {
    let mut done = vec![];
    let mut current: Option<(String, Option<String>)> = None;
    for l in out.lines() {
        let mut rest = l;
        if let Some(i) = l.find("test ").filter(|_| l.contains(" ... ")) {
            let s = &l[i + 5..];
            if let Some((name, after)) = s.split_once(" ... ") {
                current = Some((name.trim().to_string(), None));
                rest = after;
            }
        }
        let Some((name, why)) = current.as_mut() else {
            continue;
        };
        if let Some(w) = rest.split("skipped: ").nth(1) {
            why.get_or_insert_with(|| w.trim().to_string());
            continue;
        }
        match rest.trim() {
            "ok" => {
                if let Some(w) = why.take() {
                    if !done.iter().any(|s: &Skip| s.test == *name) {
                        done.push(Skip { test: name.clone(), why: w });
                    }
                }
                current = None;
            }
            "FAILED" | "ignored" => current = None,
            _ => {}
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
running 4 tests
test batch_del_under_fio_leaves_nothing ... skipped: UBLK_F_BATCH_IO needs Linux 7.0+ (kernel 6.1.187)
xtask-test-time: batch_del_under_fio_leaves_nothing 0.0
ok
test plain ... ok
test loops ... skipped: --fail-io needs 6.13 (kernel 6.1.187)
[   12.3] ublkb0: detected capacity change
skipped: --fail-io needs 6.13 again (kernel 6.1.187)
ok
test broken ... skipped: part (kernel 6.1.187)
FAILED

test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.22s
";

    #[test]
    fn a_skip_is_not_a_pass() {
        let s = skips(LOG);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].test, "batch_del_under_fio_leaves_nothing");
        assert_eq!(s[0].why, "UBLK_F_BATCH_IO needs Linux 7.0+ (kernel 6.1.187)");
        assert_eq!(s[1].test, "loops");
        assert_eq!(s[1].why, "--fail-io needs 6.13 (kernel 6.1.187)");
        assert_eq!(counts(LOG), Counts { passed: 1, skipped: 2, failed: 1 });
    }

    #[test]
    fn totals_add_up_over_several_executables() {
        let two = format!("{LOG}\nrunning 1 test\ntest x ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored\n");
        assert_eq!(counts(&two), Counts { passed: 2, skipped: 2, failed: 1 });
        assert_eq!(counts("test result: ok. 0 passed; 0 failed;"), Counts::default());
    }
}
