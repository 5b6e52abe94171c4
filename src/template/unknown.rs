//! Solutions for templates this daemon does not hold: a pool that outlived a daemon
//! restart, or a template released long ago. Without its template the block cannot be
//! rebuilt for sure; the engine tries the header on the tip's templates (after a restart
//! one may have the same transactions). Only a solution whose header then meets its
//! target is saved — what the pool sent, for the operator — and at most a few a minute:
//! a bogus solution never costs a disk write.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bitcoin::hex::DisplayHex;
use stratum_core::template_distribution_sv2::SubmitSolutionOwned;
use tracing::{debug, error, warn};

use super::messages::SolvedBlock;
use crate::node::TemplateData;

/// Unknown-template solutions saved per window; more are only counted.
pub(crate) const SAVED_PER_WINDOW: u32 = 10;

/// The window [`SAVED_PER_WINDOW`] applies to.
const WINDOW: Duration = Duration::from_secs(60);

/// Saves and logs unknown-template solutions within a budget.
#[derive(Debug)]
pub(crate) struct UnknownSolutions {
    dir: PathBuf,
    window_start: Option<Instant>,
    saved: u32,
    skipped: u32,
}

impl UnknownSolutions {
    /// Saves into `dir` (the solutions directory).
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            window_start: None,
            saved: 0,
            skipped: 0,
        }
    }

    /// Saves `solution` (whose template is not held; [`super::solutions::Gate`] already
    /// answered and counted it) when `proven` (its header meets its target), unless this
    /// window's budget is spent.
    pub fn save(&mut self, solution: SubmitSolutionOwned, proven: bool, now: Instant) {
        if !proven {
            debug!(
                template_id = solution.template_id,
                "solution for an unknown template without proof of work; not saved"
            );
            return;
        }
        if self
            .window_start
            .is_none_or(|t| now.duration_since(t) >= WINDOW)
        {
            if self.skipped > 0 {
                warn!(
                    skipped = self.skipped,
                    "solutions for unknown templates were not saved (more than {SAVED_PER_WINDOW} a minute)"
                );
            }
            self.window_start = Some(now);
            self.saved = 0;
            self.skipped = 0;
        }
        if self.saved >= SAVED_PER_WINDOW {
            self.skipped += 1;
            return;
        }
        self.saved += 1;
        let path = self.dir.join(file_name(solution.template_id));
        warn!(
            template_id = solution.template_id,
            path = %path.display(),
            "solution for an unknown template (from before a restart, or released); saved, not submitted"
        );
        tokio::spawn(save(path, contents(&solution)));
    }
}

/// Whether `solution`'s header, rebuilt on one of `candidates` (templates of the tip)
/// whose height push its coinbase starts with, meets its target. After a restart a
/// template of the same tip may have the same transactions; a bogus or stale solution
/// never passes, so it never costs a disk write.
pub(crate) fn proven<'a>(
    candidates: impl IntoIterator<Item = &'a TemplateData>,
    solution: &SubmitSolutionOwned,
) -> bool {
    candidates.into_iter().any(|data| {
        SolvedBlock::new(data, solution).is_ok_and(|s| {
            let prefix = &data.coinbase.script_sig_prefix;
            let script_sig = s.coinbase.input.first().map(|i| i.script_sig.as_bytes());
            script_sig.is_some_and(|b| b.starts_with(prefix)) && s.meets_target()
        })
    })
}

/// `unknown-<template id>-<unix time in ms>.solution.json`.
fn file_name(template_id: u64) -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("unknown-{template_id}-{millis}.solution.json")
}

/// What the pool sent, as JSON.
fn contents(solution: &SubmitSolutionOwned) -> String {
    serde_json::json!({
        "template_id": solution.template_id,
        "version": solution.version,
        "header_timestamp": solution.header_timestamp,
        "header_nonce": solution.header_nonce,
        "coinbase": solution.coinbase_tx.as_bytes().to_lower_hex_string(),
    })
    .to_string()
}

async fn save(path: PathBuf, contents: String) {
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let result = async {
        tokio::fs::create_dir_all(&dir).await?;
        tokio::fs::write(&path, contents).await
    }
    .await;
    if let Err(e) = result {
        error!(path = %path.display(), error = %e, "cannot save the solution");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratum_core::binary_sv2::B064KOwned;

    fn solution(template_id: u64) -> SubmitSolutionOwned {
        SubmitSolutionOwned {
            template_id,
            version: 0x2000_0000,
            header_timestamp: 1_700_000_000,
            header_nonce: 7,
            coinbase_tx: B064KOwned::new(vec![1, 2, 3]).expect("fits"),
        }
    }

    #[tokio::test]
    async fn saves_a_bounded_number_a_minute() {
        let dir = tempfile::tempdir().unwrap();
        let mut unknown = UnknownSolutions::new(dir.path().to_path_buf());
        let t0 = Instant::now();
        for id in 0..SAVED_PER_WINDOW as u64 + 5 {
            unknown.save(solution(id), true, t0);
        }
        assert_eq!((unknown.saved, unknown.skipped), (SAVED_PER_WINDOW, 5));
        unknown.save(solution(99), true, t0 + WINDOW);
        assert_eq!((unknown.saved, unknown.skipped), (1, 0), "a new window");
        unknown.save(solution(100), false, t0 + WINDOW);
        assert_eq!(unknown.saved, 1, "no proof of work, not saved");
    }

    #[test]
    fn the_file_holds_what_the_pool_sent() {
        let json: serde_json::Value = serde_json::from_str(&contents(&solution(42))).unwrap();
        assert_eq!(json["template_id"], 42);
        assert_eq!(json["header_nonce"], 7);
        assert_eq!(json["coinbase"], "010203");
        assert!(file_name(42).starts_with("unknown-42-"));
    }
}
