//! imprint-sync: keeps Imprint's copy of a partner's customers in step with the partner's
//! PostgreSQL outbox. `app::main` is the whole program; `main.rs` only parses arguments.

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod engine;
pub mod exit;
pub mod imprint;
pub mod inspect;
pub mod labels;
pub mod limits;
pub mod outbox;
pub mod profile;
pub mod reconcile;
pub mod run;
pub mod sandbox;
pub mod signals;
pub mod status;
pub mod telemetry;
pub mod traffic;
