//! Outbox row -> "Update a customer" request, with validation. Every rule lives here (the
//! limits in `crate::limits`); a failure names the field and never echoes the value (it may
//! be personal data).

pub mod compare;
mod iso;

use serde_json::{Map, Value};

use crate::imprint::model::{Address, CustomerHistory, UpdateCustomerRequest};
use crate::limits;
use crate::outbox::model::OutboxRow;

/// A row that cannot be mapped: which field, and why (never the value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ProfileError {
    pub field: &'static str,
    pub reason: String,
}

fn err(field: &'static str, reason: impl Into<String>) -> ProfileError {
    ProfileError {
        field,
        reason: reason.into(),
    }
}

/// Checks a customer id: it goes into the URL path, so only `[A-Za-z0-9_-]`, 1 to 64.
pub fn check_customer_id(id: &str) -> Result<(), ProfileError> {
    if id.is_empty() {
        return Err(err("customer_id", "is empty"));
    }
    if id.chars().count() > limits::CUSTOMER_ID_MAX {
        return Err(err(
            "customer_id",
            format!("is longer than {} characters", limits::CUSTOMER_ID_MAX),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(err(
            "customer_id",
            "may hold only letters, digits, '-' and '_'",
        ));
    }
    Ok(())
}

/// A customer id as logs may show it: the id once it passes [`check_customer_id`], else only
/// its length. The partner's text could be anything (an e-mail, a megabyte, a newline that
/// forges a log line); the outbox id beside it finds the row.
#[derive(Debug, Clone, Copy)]
pub struct LogId<'a>(pub &'a str);

impl std::fmt::Display for LogId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match check_customer_id(self.0) {
            Ok(()) => f.write_str(self.0),
            Err(_) => write!(f, "invalid id (len {})", self.0.len()),
        }
    }
}

/// Checks a free text field: at most 255 characters, no control characters.
pub fn check_text(field: &'static str, v: &str) -> Result<(), ProfileError> {
    if v.chars().count() > limits::TEXT_MAX {
        return Err(err(
            field,
            format!("is longer than {} characters", limits::TEXT_MAX),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(err(field, "contains a control character"));
    }
    Ok(())
}

/// A sane email check: one `@`, a non-empty local part, a dotted domain of letters, digits
/// and hyphens, no spaces.
pub fn check_email(v: &str) -> Result<(), ProfileError> {
    check_text("email", v)?;
    let bad = || err("email", "is not a valid email address");
    if v.len() > limits::EMAIL_MAX {
        return Err(bad());
    }
    let (local, domain) = v.rsplit_once('@').ok_or_else(bad)?;
    if local.is_empty() || local.len() > 64 || local.contains('@') || local.contains(' ') {
        return Err(bad());
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_alphanumeric() || c == '-')
    };
    if labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(bad());
    }
    Ok(())
}

/// The documented phone pattern `^\+?[1-9]\d{1,14}$`.
pub fn check_phone(v: &str) -> Result<(), ProfileError> {
    let digits = v.strip_prefix('+').unwrap_or(v);
    let ok = digits.len() >= 2
        && digits.len() <= 15
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    if ok {
        Ok(())
    } else {
        Err(err(
            "phone",
            "is not an E.164 number (^\\+?[1-9]\\d{1,14}$)",
        ))
    }
}

fn check_code(field: &'static str, v: &str, list: &[&str], what: &str) -> Result<(), ProfileError> {
    if list.binary_search(&v).is_ok() {
        Ok(())
    } else {
        Err(err(field, format!("is not {what}")))
    }
}

/// ISO 639-1: two lower-case letters from the real list.
pub fn check_language(field: &'static str, v: &str) -> Result<(), ProfileError> {
    check_code(
        field,
        v,
        &iso::LANGUAGES_639_1,
        "an ISO 639-1 language code (two lower-case letters, e.g. en)",
    )
}

/// ISO 3166-1 alpha-3 from the real list.
pub fn check_country(field: &'static str, v: &str) -> Result<(), ProfileError> {
    check_code(
        field,
        v,
        &iso::COUNTRIES_ALPHA3,
        "an ISO 3166-1 alpha-3 country code (e.g. USA)",
    )
}

/// ISO 4217 from the real list.
pub fn check_currency(field: &'static str, v: &str) -> Result<(), ProfileError> {
    check_code(
        field,
        v,
        &iso::CURRENCIES,
        "an ISO 4217 currency code (e.g. USD)",
    )
}

/// A count or an amount: never negative.
pub fn check_non_negative(field: &'static str, v: i64) -> Result<(), ProfileError> {
    if v < 0 {
        Err(err(field, "must not be negative"))
    } else {
        Ok(())
    }
}

/// `metadata`: a JSON object of at most 16 KiB serialized.
pub fn check_metadata(v: &Value) -> Result<Map<String, Value>, ProfileError> {
    let Value::Object(map) = v else {
        return Err(err("metadata", "must be a JSON object"));
    };
    let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
    if size > limits::METADATA_MAX_BYTES {
        return Err(err(
            "metadata",
            format!(
                "is {size} bytes serialized; the limit is {}",
                limits::METADATA_MAX_BYTES
            ),
        ));
    }
    Ok(map.clone())
}

fn text(
    field: &'static str,
    v: &Option<String>,
    check: fn(&'static str, &str) -> Result<(), ProfileError>,
) -> Result<Option<String>, ProfileError> {
    match v {
        Some(s) => {
            check_text(field, s)?;
            check(field, s)?;
            Ok(Some(s.clone()))
        }
        None => Ok(None),
    }
}

fn any_text(_: &'static str, _: &str) -> Result<(), ProfileError> {
    Ok(())
}

/// Maps an outbox row to the request, validating every field. NULL columns are left out.
pub fn map_row(row: &OutboxRow) -> Result<UpdateCustomerRequest, ProfileError> {
    if let Some(d) = &row.defect {
        return Err(err(d.column, d.reason.clone()));
    }
    check_customer_id(&row.customer_id)?;
    let email = text("email", &row.email, |_, v| check_email(v))?;
    let phone = text("phone", &row.phone, |_, v| check_phone(v))?;
    let first_name = text("first_name", &row.first_name, any_text)?;
    let last_name = text("last_name", &row.last_name, any_text)?;
    let preferred_language = text(
        "preferred_language",
        &row.preferred_language,
        check_language,
    )?;
    let street_line1 = text("street_line1", &row.street_line1, any_text)?;
    let street_line2 = text("street_line2", &row.street_line2, any_text)?;
    let city = text("city", &row.city, any_text)?;
    let state = text("state", &row.state, any_text)?;
    let postal_code = text("postal_code", &row.postal_code, any_text)?;
    let country = text("country", &row.country, check_country)?;
    let ltv_currency = text("ltv_currency", &row.ltv_currency, check_currency)?;
    let loyalty_tier = text("loyalty_tier", &row.loyalty_tier, any_text)?;
    if let Some(v) = row.account_tenure {
        check_non_negative("account_tenure", v.into())?;
    }
    if let Some(v) = row.ltv_amount {
        check_non_negative("ltv_amount", v)?;
    }
    if let Some(v) = row.transaction_count {
        check_non_negative("transaction_count", v)?;
    }
    let metadata = row.metadata.as_ref().map(check_metadata).transpose()?;

    let address = Address {
        street_line1: street_line1.clone(),
        street_line2: street_line2.clone(),
        city: city.clone(),
        state: state.clone(),
        postal_code: postal_code.clone(),
        country,
        extra: Map::new(),
    };
    let history = CustomerHistory {
        email: email.clone(),
        phone: phone.clone(),
        first_name: first_name.clone(),
        last_name: last_name.clone(),
        preferred_language: preferred_language.clone(),
        address: (!address.is_empty()).then_some(address),
        account_tenure: row.account_tenure,
        ltv_amount: row.ltv_amount,
        ltv_currency,
        loyalty_tier,
        account_created_at: row.account_created_at,
        transaction_count: row.transaction_count,
    };
    Ok(UpdateCustomerRequest {
        email,
        phone,
        first_name,
        last_name,
        preferred_language,
        street_line1,
        street_line2,
        city,
        state,
        postal_code,
        customer_history: (!history.is_empty()).then_some(history),
        metadata,
    })
}

/// The request with every personal value replaced, for `run --dry-run` output.
pub fn redacted(req: &UpdateCustomerRequest) -> Value {
    fn walk(v: &mut Value, key: Option<&str>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m.iter_mut() {
                    walk(child, Some(k));
                }
            }
            Value::String(s) => {
                let keep = matches!(
                    key,
                    Some("preferred_language" | "country" | "ltv_currency" | "loyalty_tier")
                );
                if !keep {
                    *s = "[redacted]".into();
                }
            }
            _ => {}
        }
    }
    let mut v = serde_json::to_value(req).unwrap_or(Value::Null);
    if let Some(Value::Object(m)) = v.get_mut("metadata") {
        // Metadata is the partner's own: show only its keys.
        for child in m.values_mut() {
            *child = Value::String("[redacted]".into());
        }
    }
    walk(&mut v, None);
    v
}
