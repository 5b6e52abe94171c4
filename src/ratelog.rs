//! A budget for repetitive log lines: the first few of each period are written in full, the
//! rest only counted and reported as one summary line when the next period starts or the
//! owner finishes. It keeps a misbehaving peer from turning its input into log volume.

use std::time::{Duration, Instant};

/// Whether to write one occurrence, and the count of the previous period's suppressed ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Write this occurrence in full.
    pub log: bool,
    /// Occurrences suppressed in the period that just ended, to report now (never zero).
    pub suppressed: Option<u64>,
}

/// Counts occurrences of one kind of log line per period.
#[derive(Clone, Debug)]
pub struct LogBudget {
    burst: u32,
    period: Duration,
    period_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    /// A budget of `burst` full lines every `period`.
    pub fn new(burst: u32, period: Duration) -> Self {
        LogBudget {
            burst,
            period,
            period_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Records one occurrence at `now`.
    pub fn hit(&mut self, now: Instant) -> Verdict {
        let mut summary = None;
        let expired = self
            .period_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.period);
        if expired {
            summary = self.finish();
            self.period_start = Some(now);
            self.used = 0;
        }
        let log = self.used < self.burst;
        if log {
            self.used += 1;
        } else {
            self.suppressed += 1;
        }
        Verdict {
            log,
            suppressed: summary,
        }
    }

    /// Occurrences suppressed and not yet reported; resets the count.
    pub fn finish(&mut self) -> Option<u64> {
        let suppressed = std::mem::take(&mut self.suppressed);
        (suppressed > 0).then_some(suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_period_then_a_summary() {
        let start = Instant::now();
        let mut budget = LogBudget::new(2, Duration::from_secs(60));
        let logged: Vec<bool> = (0..5).map(|_| budget.hit(start).log).collect();
        assert_eq!(logged, [true, true, false, false, false]);
        let next = budget.hit(start + Duration::from_secs(61));
        assert_eq!(
            next,
            Verdict {
                log: true,
                suppressed: Some(3)
            }
        );
        assert_eq!(budget.finish(), None);
        budget.hit(start + Duration::from_secs(62));
        budget.hit(start + Duration::from_secs(62));
        assert_eq!(budget.finish(), Some(1));
    }
}
