//! Per-kernel timing for finding where time goes (`GENREC_PROFILE=1`).
//!
//! When enabled, every dispatch is submitted and waited for on its own and its wall time is
//! added to its kernel's total (keyed `name:entry`). This removes step batching, so absolute
//! throughput drops; use it for the breakdown, not for benchmark figures. `genrec` prints the
//! table on exit; library users call [`crate::gpu::Gpu::profile_report`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub(crate) struct Profile {
    pub enabled: bool,
    /// Per kernel: (dispatches, total time).
    totals: Mutex<HashMap<String, (u64, Duration)>>,
}

impl Profile {
    /// Enabled when `GENREC_PROFILE` is set to anything but `0` or empty.
    pub fn from_env() -> Profile {
        let enabled = std::env::var("GENREC_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
        Profile { enabled, totals: Mutex::default() }
    }

    pub fn add(&self, kernel: String, t: Duration) {
        let mut m = self.totals.lock().unwrap();
        let e = m.entry(kernel).or_default();
        e.0 += 1;
        e.1 += t;
    }

    /// The totals as a table, slowest kernel first; `None` when disabled or nothing ran.
    pub fn report(&self) -> Option<String> {
        let m = self.totals.lock().unwrap();
        if !self.enabled || m.is_empty() {
            return None;
        }
        let mut rows: Vec<(&String, &(u64, Duration))> = m.iter().collect();
        rows.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(b.0)));
        let all: f64 = rows.iter().map(|r| r.1 .1.as_secs_f64()).sum();
        let mut out = format!(
            "GENREC_PROFILE: {:.3} s in {} dispatches\n{:<40} {:>9} {:>11} {:>9} {:>6}\n",
            all,
            rows.iter().map(|r| r.1 .0).sum::<u64>(),
            "kernel",
            "calls",
            "total ms",
            "mean ms",
            "%"
        );
        for (k, &(n, t)) in rows {
            let ms = t.as_secs_f64() * 1e3;
            out.push_str(&format!(
                "{k:<40} {n:>9} {ms:>11.1} {:>9.3} {:>6.1}\n",
                ms / n as f64,
                100.0 * t.as_secs_f64() / all.max(1e-12)
            ));
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_sorts_by_total_time_and_sums_calls() {
        let p = Profile { enabled: true, ..Default::default() };
        assert!(p.report().is_none());
        p.add("a:x".into(), Duration::from_millis(2));
        p.add("b:y".into(), Duration::from_millis(5));
        p.add("a:x".into(), Duration::from_millis(4));
        let r = p.report().unwrap();
        let lines: Vec<&str> = r.lines().collect();
        assert!(lines[0].contains("3 dispatches"), "{r}");
        assert!(lines[2].starts_with("a:x") && lines[2].contains(" 2 "), "{r}");
        assert!(lines[3].starts_with("b:y"), "{r}");
        assert!(Profile::default().report().is_none());
    }
}
