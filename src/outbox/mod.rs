//! The outbox: its row type and every SQL statement that works it.

pub mod claim;
pub mod model;
pub mod plan;
pub mod store;
