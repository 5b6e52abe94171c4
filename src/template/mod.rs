//! The template engine: turns the node's templates into Template Distribution messages.

mod api;

pub use api::*;
