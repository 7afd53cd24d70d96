//! The customer object of the sandbox: the body rules of "Update a customer" and how a valid
//! body changes the stored customer. The rules reuse the profile validators, so the sandbox
//! refuses exactly what the daemon would refuse to send.

use serde_json::{Map, Value, json};

use crate::profile::{self, ProfileError};

/// Why a body was refused: the field as a dotted path, and a message that never echoes the
/// value (the value may be personal data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub param: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, Copy)]
enum Rule {
    Text,
    Email,
    Phone,
    Language,
    Country,
    Currency,
    Count,
    Timestamp,
}

/// The person fields, at the top level and again inside `customer_history`.
const PERSON: [(&str, Rule); 5] = [
    ("email", Rule::Email),
    ("phone", Rule::Phone),
    ("first_name", Rule::Text),
    ("last_name", Rule::Text),
    ("preferred_language", Rule::Language),
];

/// The street fields, at the top level and again in `customer_history.address`.
const STREET: [(&str, Rule); 5] = [
    ("street_line1", Rule::Text),
    ("street_line2", Rule::Text),
    ("city", Rule::Text),
    ("state", Rule::Text),
    ("postal_code", Rule::Text),
];

const HISTORY: [(&str, Rule); 6] = [
    ("account_tenure", Rule::Count),
    ("ltv_amount", Rule::Count),
    ("ltv_currency", Rule::Currency),
    ("loyalty_tier", Rule::Text),
    ("account_created_at", Rule::Timestamp),
    ("transaction_count", Rule::Count),
];

const COUNTRY: [(&str, Rule); 1] = [("country", Rule::Country)];

/// Checks a body against the documented rules; returns it as an object. Unknown fields (a
/// top-level `country`, say) are ignored, as a lenient JSON API does; `null` counts as absent.
pub fn check_body(body: &Value) -> Result<&Map<String, Value>, Invalid> {
    let top = object(body, None)?;
    check_fields(top, "", &PERSON)?;
    check_fields(top, "", &STREET)?;
    if let Some(history) = present(top, "customer_history") {
        let history = object(history, Some("customer_history"))?;
        check_fields(history, "customer_history.", &PERSON)?;
        check_fields(history, "customer_history.", &HISTORY)?;
        if let Some(address) = present(history, "address") {
            let address = object(address, Some("customer_history.address"))?;
            check_fields(address, "customer_history.address.", &STREET)?;
            check_fields(address, "customer_history.address.", &COUNTRY)?;
        }
    }
    if let Some(metadata) = present(top, "metadata") {
        profile::check_metadata(metadata).map_err(|e| invalid("metadata", &e.reason))?;
    }
    Ok(top)
}

/// A customer seen for the first time. `ssn4` and `date_of_birth` are fixed fakes, so that
/// clients must prove they filter them before storing or logging.
pub fn new_customer(id: &str, now: &str) -> Map<String, Value> {
    let v = json!({
        "id": id,
        "statuses": {"Imprint Card": "OPEN"},
        "ssn4": "1234",
        "date_of_birth": {"year": 1990, "month": 1, "day": 1},
        "address": {},
        "metadata": {},
        "created_at": now,
        "updated_at": now,
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a json! object literal is an object"),
    }
}

/// Applies a checked body: the fields given replace the stored ones, absent fields stay.
/// The street fields and `customer_history.address.country` make up `address`.
pub fn merge(customer: &mut Map<String, Value>, body: &Map<String, Value>, now: &str) {
    for (name, _) in PERSON {
        if let Some(v) = present(body, name) {
            customer.insert(name.into(), v.clone());
        }
    }
    let country = body
        .get("customer_history")
        .and_then(|h| h.get("address"))
        .and_then(|a| present_in(a, "country"));
    let address = customer
        .entry("address")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(address) = address {
        for (name, _) in STREET {
            if let Some(v) = present(body, name) {
                address.insert(name.into(), v.clone());
            }
        }
        if let Some(c) = country {
            address.insert("country".into(), c.clone());
        }
    }
    if let Some(m) = present(body, "metadata") {
        customer.insert("metadata".into(), m.clone());
    }
    customer.insert("updated_at".into(), Value::String(now.into()));
}

/// The admin API's drift: top-level fields replace the stored ones (`null` removes one);
/// `address` and `statuses` are merged key by key (`null` removes a key). The caller checked
/// that the patch is an object without `id`, and that `address` and `statuses` are objects.
pub fn overwrite(customer: &mut Map<String, Value>, fields: &Map<String, Value>, now: &str) {
    for (name, v) in fields {
        match (name.as_str(), v) {
            ("address" | "statuses", Value::Object(patch)) => {
                let slot = customer
                    .entry(name.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(inner) = slot {
                    for (k, v) in patch {
                        if v.is_null() {
                            inner.remove(k);
                        } else {
                            inner.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            (_, Value::Null) => {
                customer.remove(name);
            }
            _ => {
                customer.insert(name.clone(), v.clone());
            }
        }
    }
    customer.insert("updated_at".into(), Value::String(now.into()));
}

fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn present_in<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_object().and_then(|o| present(o, key))
}

fn object<'a>(v: &'a Value, param: Option<&str>) -> Result<&'a Map<String, Value>, Invalid> {
    v.as_object().ok_or_else(|| Invalid {
        param: param.map(str::to_owned),
        message: format!("{} must be a JSON object", param.unwrap_or("the body")),
    })
}

fn invalid(param: &str, reason: &str) -> Invalid {
    Invalid {
        param: Some(param.to_owned()),
        message: format!("{param} {reason}"),
    }
}

fn check_fields(
    obj: &Map<String, Value>,
    prefix: &str,
    rules: &[(&'static str, Rule)],
) -> Result<(), Invalid> {
    for &(name, rule) in rules {
        if let Some(v) = present(obj, name) {
            check_value(name, rule, v).map_err(|e| invalid(&format!("{prefix}{name}"), &e))?;
        }
    }
    Ok(())
}

fn check_value(name: &'static str, rule: Rule, v: &Value) -> Result<(), String> {
    let reason = |e: ProfileError| e.reason;
    if let Rule::Count = rule {
        let n = v.as_i64().ok_or("must be an integer")?;
        return profile::check_non_negative(name, n).map_err(reason);
    }
    let s = v.as_str().ok_or("must be a string")?;
    profile::check_text(name, s).map_err(reason)?;
    match rule {
        Rule::Email => profile::check_email(s).map_err(reason),
        Rule::Phone => profile::check_phone(s).map_err(reason),
        Rule::Language => profile::check_language(name, s).map_err(reason),
        Rule::Country => profile::check_country(name, s).map_err(reason),
        Rule::Currency => profile::check_currency(name, s).map_err(reason),
        Rule::Timestamp => chrono::DateTime::parse_from_rfc3339(s)
            .map(drop)
            .map_err(|_| "is not an RFC 3339 timestamp".into()),
        Rule::Text | Rule::Count => Ok(()),
    }
}
