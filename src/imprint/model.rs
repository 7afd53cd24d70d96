//! The wire types of `POST /v2/customers/{customer_id}`, field for field as the docs show.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The body of "Update a customer". Every field is optional; an absent field is left
/// unchanged by Imprint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateCustomerRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub street_line1: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub street_line2: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_history: Option<CustomerHistory>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

impl UpdateCustomerRequest {
    /// What this request sets, flat and keyed by outbox column name, in the mapped form
    /// that was sent (phone in E.164, country alpha-3). Stored merged per column as
    /// `customer_sync_state.accepted` when Imprint accepts the request.
    pub fn fields(&self) -> Map<String, Value> {
        let Value::Object(mut top) = serde_json::to_value(self).unwrap_or_default() else {
            return Map::new();
        };
        if let Some(Value::Object(mut history)) = top.remove("customer_history") {
            if let Some(country) = history
                .remove("address")
                .and_then(|a| a.get("country").cloned())
            {
                top.insert("country".into(), country);
            }
            // The identity fields repeat the top level's; the rest exist only here.
            for k in HISTORY_ONLY {
                if let Some(v) = history.remove(k) {
                    top.insert(k.into(), v);
                }
            }
        }
        top
    }
}

/// The fields of `customer_history` that have no top-level twin.
pub(crate) const HISTORY_ONLY: [&str; 6] = [
    "account_tenure",
    "ltv_amount",
    "ltv_currency",
    "loyalty_tier",
    "account_created_at",
    "transaction_count",
];

/// `customer_history`: what the partner knows of the customer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerHistory {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    /// Months.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_tenure: Option<i32>,
    /// Minor currency units (34000 = $340.00).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ltv_amount: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ltv_currency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loyalty_tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_created_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_count: Option<i64>,
}

impl CustomerHistory {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A postal address; `country` is ISO 3166-1 alpha-3.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Address {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub street_line1: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub street_line2: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// Fields the API added that this version does not know; kept, not rejected.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Address {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The customer object Imprint answers with. Only `id` is required; unknown fields are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// Card program name -> `OPEN` | `CLOSED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statuses: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_language: Option<String>,
    /// Sensitive: never logged, not stored unless `privacy.store_sensitive_response_fields`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssn4: Option<String>,
    /// Sensitive: as `ssn4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_of_birth: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner_customer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    /// Fields the API added that this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Customer {
    /// `updated_at` parsed, where it is RFC 3339.
    pub fn updated_at(&self) -> Option<DateTime<Utc>> {
        self.updated_at
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
    }

    /// The object as `customer_sync_state.response` keeps it (see
    /// [`crate::profile::compare::stored_response`]), without `ssn4` and `date_of_birth`
    /// unless `keep_sensitive`: wherever they are, in whatever case or spelling (`SSN4`,
    /// `dateOfBirth`, nested in an object this version does not know), so a change of the
    /// API's shape cannot slip them into the database.
    pub fn into_stored(mut self: Box<Self>, keep_sensitive: bool) -> Value {
        if !keep_sensitive {
            self.ssn4 = None;
            self.date_of_birth = None;
        }
        let mut v = serde_json::to_value(&*self).unwrap_or(Value::Null);
        if !keep_sensitive {
            strip_sensitive(&mut v);
        }
        v
    }
}

/// JSON text fit for a `jsonb` column: jsonb refuses `\u0000`, and a NUL inside a string
/// the API returned must not stop the write-back of a batch.
pub fn json_text<T: Serialize + ?Sized>(v: &T) -> String {
    let text = serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned());
    if !text.contains("\\u0000") {
        return text;
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(mut v) => {
            strip_nul(&mut v);
            v.to_string()
        }
        Err(_) => text,
    }
}

/// Removes every key that names `ssn4` or `date_of_birth` (ignoring case, `_` and `-`).
fn strip_sensitive(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| {
                let k: String = k
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .map(|c| c.to_ascii_lowercase())
                    .collect();
                !matches!(k.as_str(), "ssn4" | "dateofbirth")
            });
            m.values_mut().for_each(strip_sensitive);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_sensitive),
        _ => {}
    }
}

/// Removes NUL characters from every string (keys included) of a JSON value.
fn strip_nul(v: &mut Value) {
    match v {
        Value::String(s) => s.retain(|c| c != '\0'),
        Value::Array(a) => a.iter_mut().for_each(strip_nul),
        Value::Object(m) => {
            let entries = std::mem::take(m);
            for (mut k, mut child) in entries {
                k.retain(|c| c != '\0');
                strip_nul(&mut child);
                m.insert(k, child);
            }
        }
        _ => {}
    }
}
