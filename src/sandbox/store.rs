//! What the sandbox keeps per customer: the object, the journal of bodies received, and the
//! requests in flight. Sharded so that concurrent requests for different customers rarely
//! meet on a lock; each lock is held for a few map operations and never across an await.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use axum::body::Bytes;
use serde_json::{Map, Value};

use super::customer;

const SHARDS: usize = 64;
/// Bodies kept per customer: the newest ones.
pub const JOURNAL_MAX: usize = 1000;

#[derive(Default)]
struct Entry {
    customer: Option<Map<String, Value>>,
    /// Raw bodies: cloning `Bytes` is a reference count, so recording costs no copy.
    journal: VecDeque<Bytes>,
    in_flight: u64,
    /// Deleted through the admin API: GET and POST answer 404 from then on.
    deleted: bool,
}

impl Entry {
    fn is_unused(&self) -> bool {
        self.customer.is_none() && self.journal.is_empty() && self.in_flight == 0 && !self.deleted
    }
}

type Shard = HashMap<String, Entry>;

pub struct Store {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    customers: AtomicU64,
    max_concurrent: AtomicU64,
}

/// One request in flight for a customer; leaving (even by cancellation) counts it down.
pub struct InFlight<'a> {
    store: &'a Store,
    id: &'a str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut shard = self.store.shard(self.id);
        if let Some(entry) = shard.get_mut(self.id) {
            entry.in_flight -= 1;
            // A GET for an unknown id leaves nothing behind.
            if entry.is_unused() {
                shard.remove(self.id);
            }
        }
    }
}

impl Store {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            customers: AtomicU64::new(0),
            max_concurrent: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: &str) -> MutexGuard<'_, Shard> {
        let i = usize::try_from(self.hasher.hash_one(id) % SHARDS as u64)
            .expect("a remainder of SHARDS fits in usize");
        // A panic while holding a shard leaves plain data behind: keep serving it.
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn with_entry<R>(&self, id: &str, f: impl FnOnce(&mut Entry) -> R) -> R {
        let mut shard = self.shard(id);
        match shard.get_mut(id) {
            Some(entry) => f(entry),
            None => f(shard.entry(id.to_owned()).or_default()),
        }
    }

    /// Counts a request in for `id` and records the highest concurrency ever seen.
    pub fn enter<'a>(&'a self, id: &'a str) -> InFlight<'a> {
        let now = self.with_entry(id, |e| {
            e.in_flight += 1;
            e.in_flight
        });
        self.max_concurrent.fetch_max(now, Ordering::Relaxed);
        InFlight { store: self, id }
    }

    /// Appends a body to the customer's journal, dropping the oldest beyond [`JOURNAL_MAX`].
    pub fn record(&self, id: &str, body: Bytes) {
        self.with_entry(id, |e| {
            if e.journal.len() == JOURNAL_MAX {
                e.journal.pop_front();
            }
            e.journal.push_back(body);
        });
    }

    pub fn journal(&self, id: &str) -> Vec<Bytes> {
        self.shard(id)
            .get(id)
            .map(|e| e.journal.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn customer(&self, id: &str) -> Option<Map<String, Value>> {
        self.shard(id).get(id).and_then(|e| e.customer.clone())
    }

    /// Merges a checked body into the customer (creating it) and returns the result; `None`
    /// for a customer deleted through the admin API.
    pub fn update(
        &self,
        id: &str,
        body: &Map<String, Value>,
        now: &str,
    ) -> Option<Map<String, Value>> {
        self.with_entry(id, |e| {
            if e.deleted {
                return None;
            }
            let c = e.customer.get_or_insert_with(|| {
                self.customers.fetch_add(1, Ordering::Relaxed);
                customer::new_customer(id, now)
            });
            customer::merge(c, body, now);
            Some(c.clone())
        })
    }

    /// Overwrites fields of an existing customer as if changed at Imprint; `None` when there
    /// is no such customer.
    pub fn patch(
        &self,
        id: &str,
        fields: &Map<String, Value>,
        now: &str,
    ) -> Option<Map<String, Value>> {
        let mut shard = self.shard(id);
        let c = shard.get_mut(id)?.customer.as_mut()?;
        customer::overwrite(c, fields, now);
        Some(c.clone())
    }

    /// Removes a customer as if deleted at Imprint; false when there was none.
    pub fn delete(&self, id: &str) -> bool {
        let mut shard = self.shard(id);
        match shard.get_mut(id) {
            Some(e) if e.customer.is_some() => {
                e.customer = None;
                e.deleted = true;
                true
            }
            _ => false,
        }
    }

    pub fn customers(&self) -> u64 {
        self.customers.load(Ordering::Relaxed)
    }

    pub fn max_concurrent(&self) -> u64 {
        self.max_concurrent.load(Ordering::Relaxed)
    }

    /// Forgets the journals and the concurrency high-water mark; customers stay.
    pub fn clear_journals(&self) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.retain(|_, e| {
                e.journal.clear();
                !e.is_unused()
            });
        }
        self.max_concurrent.store(0, Ordering::Relaxed);
    }
}
