//! The template engine: turns the node's templates into Template Distribution messages.
//!
//! Clients with equal `CoinbaseOutputConstraints` form a group that shares one node
//! template per update. New tips go out at once as `NewTemplate(future)` +
//! `SetNewPrevHash`; fee rises of at least `fee_delta` as `NewTemplate(future=false)` at
//! most once per `template_interval`. Templates of the current and (for a grace period)
//! the previous tip stay held in the node for late solutions; older ones are released.

mod api;
mod engine;
mod group;
pub mod messages;

pub use api::*;
pub use engine::{spawn, EngineConfig, EngineError, EngineStatus};
pub use group::{block_reserved_weight, create_options, Reason};
