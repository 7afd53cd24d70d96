//! Imprint's partner API: the wire types, the client, and what each answer means.

pub mod client;
pub mod error;
pub mod model;

pub use client::{Client, ClientSettings};
pub use model::{Customer, UpdateCustomerRequest};
