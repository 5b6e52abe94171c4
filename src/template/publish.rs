//! From a group's template to a held one: checked against the node's tip, given an id,
//! its messages encoded once for every client, and recorded in the store.

use std::sync::Arc;

use stratum_core::template_distribution_sv2::{NewTemplateOwned, SetNewPrevHashOwned};
use tracing::{debug, error, info, info_span};

use stratum_core::parsers_sv2::TemplateDistributionOwned;

use super::api::{Constraints, SharedFrame};
use super::build::Reason;
use super::messages::announce;
use super::store::{Held, TemplateStore};
use crate::metrics::metrics;
use crate::node::Template;

/// What the engine keeps with each held template.
#[derive(Clone, Debug)]
pub(crate) struct Published {
    /// The node's template.
    pub template: Template,
    /// Its `NewTemplate` (future for a tip's first template).
    pub new_template: Arc<NewTemplateOwned>,
    /// Its `SetNewPrevHash`, sent with it on a new tip or to a client joining later.
    pub prev_hash_msg: Arc<SetNewPrevHashOwned>,
    /// Both encoded once for every client of the group.
    pub frames: (SharedFrame, SharedFrame),
}

/// Records `template` of `group`, made for `reason`, in `store` and returns its id;
/// `None` when it is not built on the node's tip (its group will catch up) or cannot
/// be encoded.
pub(crate) fn hold(
    store: &mut TemplateStore<Published>,
    group: Constraints,
    template: &Template,
    reason: Reason,
) -> Option<u64> {
    let data = template.data();
    let prev_hash = data.header.prev_blockhash;
    if store.tip() != Some(prev_hash) {
        debug!(%prev_hash, "template not on the node's tip; its group will catch up");
        return None;
    }
    let future = matches!(reason, Reason::Tip | Reason::Constraints);
    let (new_template, prev_hash_msg) = match announce(store.next_id(), future, data) {
        Ok((a, b)) => (Arc::new(a), Arc::new(b)),
        Err(e) => {
            error!(error = %e, "template cannot be sent");
            return None;
        }
    };
    let encoded = SharedFrame::encode(
        TemplateDistributionOwned::NewTemplate((*new_template).clone()),
        "NewTemplate",
    )
    .and_then(|nt| {
        let snph = TemplateDistributionOwned::SetNewPrevHash((*prev_hash_msg).clone());
        Ok((nt, SharedFrame::encode(snph, "SetNewPrevHash")?))
    });
    let frames = match encoded {
        Ok(frames) => frames,
        Err(e) => {
            error!(error = %e, "template cannot be sent");
            return None;
        }
    };
    let published = Published {
        template: template.clone(),
        new_template,
        prev_hash_msg,
        frames,
    };
    let excess_data = data.coinbase.witness.clone().unwrap_or_default();
    let held = Held::new(published, group, prev_hash, excess_data);
    let id = store.insert(held);
    crate::status::node_facts().template_made(prev_hash, data.height().saturating_sub(1));
    let _span = info_span!("template", template_id = id).entered();
    info!(
        reason = reason.label(),
        fees = data.total_fees().to_sat(),
        txs = data.tx_fees.len(),
        "new template"
    );
    metrics()
        .templates_created
        .with_label_values(&[reason.label()])
        .inc();
    Some(id)
}
