//! The rules of one client's Template Distribution stream, checked on every message the
//! test clients receive (a [`CheckedClient`] feeds each one to its [`StreamChecker`]):
//!
//! - every `SetNewPrevHash` names a template sent before as a future `NewTemplate`;
//! - a non-future `NewTemplate` is for the tip the client is on: it comes after at least
//!   one `SetNewPrevHash`, and it builds on the block that one activated (the BIP34
//!   height in its `coinbase_prefix` is the activated template's), so a template for a
//!   new tip sent ahead of that tip's `SetNewPrevHash` is caught;
//! - template ids are never reused: an id sent again names the same template (a client
//!   that sends `CoinbaseOutputConstraints` again gets its current template again).
//!
//! A helper may skip messages it has no use for, but only after they passed the check.

use std::collections::{HashMap, VecDeque};
use std::ops::{Deref, DerefMut};

use stratum_core::template_distribution_sv2::NewTemplateOwned;
use sv2_tpd::sv2::{ClientError, TdpClient, TdpMessage};

/// Messages kept to show what led to a broken rule.
const HISTORY: usize = 16;

/// What one client was sent so far, as far as the rules need it.
#[derive(Debug, Default)]
pub struct StreamChecker {
    /// Every template sent, by id (as a non-future template: a resend may be future).
    ids: HashMap<u64, NewTemplateOwned>,
    /// Future templates not activated yet: id → the height they build.
    future: HashMap<u64, Option<u32>>,
    /// The height of the block a template for the client's current tip builds; outer
    /// `None` before the first `SetNewPrevHash`.
    tip: Option<Option<u32>>,
    history: VecDeque<String>,
}

impl StreamChecker {
    /// Checks `message`, the next one of the stream; `Err` names the broken rule and the
    /// messages before it.
    pub fn observe(&mut self, message: &TdpMessage) -> Result<(), String> {
        let outcome = match message {
            TdpMessage::NewTemplate(t) => self.new_template(t),
            TdpMessage::SetNewPrevHash(p) => self.set_new_prev_hash(p.template_id),
            _ => Ok(()),
        };
        let summary = summary(message);
        let outcome = outcome.map_err(|rule| {
            let before: Vec<&str> = self.history.iter().map(String::as_str).collect();
            format!(
                "{rule}\n  message: {summary}\n  after: [{}]",
                before.join(", ")
            )
        });
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(summary);
        outcome
    }

    fn new_template(&mut self, t: &NewTemplateOwned) -> Result<(), String> {
        let mut seen_as = t.clone();
        seen_as.future_template = false;
        match self.ids.get(&t.template_id) {
            Some(before) if *before != seen_as => {
                return Err(format!(
                    "template id {} was used before for another template",
                    t.template_id
                ))
            }
            Some(_) => {}
            None => {
                self.ids.insert(t.template_id, seen_as);
            }
        }
        let height = bip34_height(t.coinbase_prefix.as_bytes());
        if t.future_template {
            self.future.insert(t.template_id, height);
            return Ok(());
        }
        match self.tip {
            None => Err("a non-future NewTemplate before any SetNewPrevHash".into()),
            Some(Some(tip)) if height.is_some_and(|h| h != tip) => Err(format!(
                "a non-future NewTemplate builds block {} but the client's tip has the \
                 templates of block {tip}: its tip's SetNewPrevHash has not come yet",
                height.unwrap_or_default()
            )),
            Some(_) => Ok(()),
        }
    }

    fn set_new_prev_hash(&mut self, template_id: u64) -> Result<(), String> {
        match self.future.remove(&template_id) {
            Some(height) => {
                self.tip = Some(height);
                Ok(())
            }
            None => Err(format!(
                "SetNewPrevHash for template {template_id}, which did not come before as a \
                 future NewTemplate"
            )),
        }
    }
}

/// The height pushed first in a coinbase scriptSig (BIP34): `OP_0`, `OP_1`..`OP_16`, or a
/// push of up to 8 little-endian bytes. `None` when the prefix is not such a push.
pub fn bip34_height(prefix: &[u8]) -> Option<u32> {
    match *prefix.first()? {
        0 => Some(0),
        op @ 0x51..=0x60 => Some(u32::from(op - 0x50)),
        len @ 1..=8 => {
            let bytes = prefix.get(1..=usize::from(len))?;
            let value = bytes
                .iter()
                .rev()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            u32::try_from(value).ok()
        }
        _ => None,
    }
}

fn summary(message: &TdpMessage) -> String {
    match message {
        TdpMessage::NewTemplate(t) => format!(
            "NewTemplate(id {}, future {}, height {:?})",
            t.template_id,
            t.future_template,
            bip34_height(t.coinbase_prefix.as_bytes())
        ),
        TdpMessage::SetNewPrevHash(p) => format!("SetNewPrevHash(id {})", p.template_id),
        TdpMessage::RequestTransactionDataSuccess(s) => {
            format!("RequestTransactionData.Success(id {})", s.template_id)
        }
        TdpMessage::RequestTransactionDataError { template_id, .. } => {
            format!("RequestTransactionData.Error(id {template_id})")
        }
        other => format!("{other:?}").chars().take(60).collect(),
    }
}

/// A test's SV2 client whose every received message goes through a [`StreamChecker`]:
/// a message that breaks a rule fails the test where it arrives. Everything else is the
/// wrapped [`TdpClient`].
pub struct CheckedClient {
    client: TdpClient,
    stream: StreamChecker,
}

impl CheckedClient {
    /// Checks the stream `client` receives from now on.
    pub fn new(client: TdpClient) -> Self {
        Self {
            client,
            stream: StreamChecker::default(),
        }
    }

    /// [`TdpClient::recv`], with the message checked. Cancel-safe.
    pub async fn recv(&mut self) -> Result<TdpMessage, ClientError> {
        let message = self.client.recv().await?;
        if let Err(broken) = self.stream.observe(&message) {
            panic!(
                "the Template Distribution stream from {} broke a rule: {broken}",
                self.client.server()
            );
        }
        Ok(message)
    }
}

impl Deref for CheckedClient {
    type Target = TdpClient;
    fn deref(&self) -> &TdpClient {
        &self.client
    }
}

impl DerefMut for CheckedClient {
    fn deref_mut(&mut self) -> &mut TdpClient {
        &mut self.client
    }
}
