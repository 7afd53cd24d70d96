//! The integration tests: one binary (one link of the crate), one module per area, one set
//! of helpers in `common`. Run one area with `cargo test --test it <area>::`, one test by
//! name with `cargo test --test it <name>`.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers unwrap as freely as the tests they serve"
)]

mod common;

mod adversarial_operator;
mod claim;
mod claim_adversary;
mod classify;
mod client;
mod config;
mod daemon;
mod deploy;
mod engine;
mod fate;
mod migrations;
mod operator;
mod ops;
mod plan;
mod profile;
mod reconcile;
mod sandbox;
mod traces;
mod traffic;
