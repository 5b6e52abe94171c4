//! The template engine: turns the node's templates into Template Distribution messages.
//!
//! Clients with equal `CoinbaseOutputConstraints` form a group that shares one node
//! template per update. The node decides what the tip is: a follower reports each tip it
//! moves to, up, down or sideways. A new tip goes out at once as `NewTemplate(future)` +
//! `SetNewPrevHash` — with tip-first from a template without mempool selection, followed
//! by the full one as `NewTemplate(future=false)`; fee rises of at least `fee_delta` go
//! out the same way, checked at most once per `template_interval`. Templates of the
//! current and (for a grace period) the previous tip stay held in the node for late
//! solutions, within one budget for all groups; older ones are released.
//!
//! One room per job, none of which knows the actor:
//! - `engine`: the actor that owns the state and wires the rest together;
//! - `supervisor`: each node connection's lifecycle (connect, IBD, reconnect);
//! - `best_tip`: which node's tip is served when several nodes report theirs (no I/O);
//!   `tip_board`: that choice shared with the followers, which wake the groups directly;
//! - `tip`: the tip follower, one `waitTipChanged` loop per connection;
//! - `health`: what `/health`, the node gauges and the log say about the node;
//! - `group`: the constraint groups' registry; `build`: one group's task, which builds
//!   its templates in the daemon's order (empty, full, fee checks); `tip_round`: what
//!   the tasks share on a tip (one empty template, all pairs before any full build);
//! - `ids`: template ids that never repeat across restarts;
//! - `store`: held templates, ids, pruning within one budget for all groups (no I/O);
//! - `fanout`: subscribed sessions, group choice, queueing to sessions;
//! - `cache`: a template's transactions, the one copy kept, shared by equal templates;
//! - `blocks`: reading template blocks in the background (prefetch, transaction data);
//! - `solutions`: from `SubmitSolution` to a block on disk and in the node;
//! - `resubmit`: a block the node did not take, tried again until the chain moves on;
//! - `unknown`: saving (within a budget) solutions for templates not held;
//! - [`messages`]: from template data to SV2 messages and back.

mod api;
mod best_tip;
mod blocks;
mod build;
mod cache;
mod engine;
mod fanout;
mod group;
mod health;
mod ids;
pub mod messages;
mod publish;
mod released;
mod resubmit;
mod solutions;
mod store;
mod supervisor;
mod tip;
mod tip_board;
mod tip_round;
mod unknown;

pub use api::*;
pub use build::{block_reserved_weight, create_options, Reason};
pub use engine::spawn;
pub(crate) use fanout::MAX_GROUPS;
