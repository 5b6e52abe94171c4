//! The templates this daemon handed out, remembered after their release (budget, grace
//! period, older tips) by the few hundred bytes that tell a late solution for one of them
//! from junk. A pool may still mine a released template; a block found on it can no longer
//! reach the node through its template, and its transactions are gone, but it must not
//! pass for junk either: it is saved (header and coinbase), logged, and counted
//! `released`, which pages.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::node::TemplateData;

/// Templates remembered (about 600 bytes each: header, coinbase requirements, merkle path).
pub(crate) const REMEMBERED: usize = 2048;

/// The newest [`REMEMBERED`] templates handed out, by id.
#[derive(Debug, Default)]
pub(crate) struct Issued {
    /// Ids ascending (ids only grow), each with what a header is rebuilt from.
    templates: VecDeque<(u64, Arc<TemplateData>)>,
}

impl Issued {
    /// Remembers template `id` (its fees list left out: a header does not need it).
    pub fn record(&mut self, id: u64, data: &TemplateData) {
        if self.templates.len() == REMEMBERED {
            self.templates.pop_front();
        }
        let slim = TemplateData {
            tx_fees: Vec::new(),
            ..data.clone()
        };
        self.templates.push_back((id, Arc::new(slim)));
    }

    /// What template `id` was built from, if it was handed out recently enough.
    pub fn get(&self, id: u64) -> Option<&Arc<TemplateData>> {
        let at = self
            .templates
            .binary_search_by_key(&id, |(issued, _)| *issued)
            .ok()?;
        self.templates.get(at).map(|(_, data)| data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::CoinbaseTemplate;

    fn data(fees: usize) -> TemplateData {
        let genesis = bitcoin::constants::genesis_block(bitcoin::Network::Regtest);
        TemplateData {
            header: genesis.header,
            coinbase: CoinbaseTemplate {
                version: 2,
                sequence: 0xffff_fffe,
                script_sig_prefix: vec![0x51],
                witness: None,
                block_reward_remaining: bitcoin::Amount::from_sat(1),
                required_outputs: Vec::new(),
                lock_time: 0,
            },
            merkle_path: Vec::new(),
            tx_fees: vec![bitcoin::Amount::from_sat(1); fees],
        }
    }

    #[test]
    fn the_newest_are_remembered_without_their_fees() {
        let mut issued = Issued::default();
        for id in 0..(REMEMBERED as u64 + 10) {
            issued.record(1_000 + id, &data(100));
        }
        assert!(issued.get(1_000).is_none(), "the oldest are forgotten");
        let newest = issued
            .get(1_000 + REMEMBERED as u64 + 9)
            .expect("the newest");
        assert!(newest.tx_fees.is_empty());
        assert!(issued.get(1_000 + 10).is_some());
        assert!(issued.get(7).is_none(), "never issued");
    }
}
