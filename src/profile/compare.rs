//! The comparison: Imprint's customer object against the newest profile Imprint accepted from
//! the partner, field by field, after the normalisation the mapping applies. Pure, so a table
//! test covers every rule.

use serde_json::{Map, Value};

use crate::imprint::model::Customer;

/// Where a compared outbox column lives in Imprint's customer object.
#[derive(Debug, Clone, Copy)]
enum Place {
    /// A top-level field of the same name.
    Top,
    /// A field of `address` of the same name.
    Address,
    /// `metadata`: only the keys the partner sent are compared; Imprint may hold others.
    Metadata,
}

/// How two values of a field are compared.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Exact,
    /// Codes (language, country): case does not matter.
    Code,
    /// E-mail: the mapping sends it as written; Imprint may change its case.
    Email,
    /// Phone: the same E.164 number, however written (`+1 415-555-0100` = `+14155550100`).
    Phone,
}

/// The outbox columns that Imprint's customer object shows, in output order. The
/// `customer_history`-only columns (tenure, ltv, tier, …) are not in the object: not compared.
const COMPARED: [(&str, Place, Rule); 12] = [
    ("email", Place::Top, Rule::Email),
    ("phone", Place::Top, Rule::Phone),
    ("first_name", Place::Top, Rule::Exact),
    ("last_name", Place::Top, Rule::Exact),
    ("preferred_language", Place::Top, Rule::Code),
    ("street_line1", Place::Address, Rule::Exact),
    ("street_line2", Place::Address, Rule::Exact),
    ("city", Place::Address, Rule::Exact),
    ("state", Place::Address, Rule::Exact),
    ("postal_code", Place::Address, Rule::Exact),
    ("country", Place::Address, Rule::Code),
    ("metadata", Place::Metadata, Rule::Exact),
];

/// The names of the fields whose value at Imprint differs from the accepted one. A field the
/// partner never set (absent or null in `accepted`) is not compared; fields only Imprint holds
/// are not drift.
pub fn drifted_fields(accepted: &Map<String, Value>, imprint: &Customer) -> Vec<&'static str> {
    let object = serde_json::to_value(imprint).unwrap_or(Value::Null);
    let address = object.get("address");
    COMPARED
        .iter()
        .filter(|(name, place, rule)| {
            let Some(want) = accepted.get(*name).filter(|v| !v.is_null()) else {
                return false;
            };
            let have = match place {
                Place::Top => object.get(*name),
                Place::Address => address.and_then(|a| a.get(*name)),
                Place::Metadata => {
                    return !metadata_in_step(want, object.get("metadata"));
                }
            };
            !same(*rule, want, have)
        })
        .map(|(name, _, _)| *name)
        .collect()
}

/// Imprint's answer as `customer_sync_state.response` stores it: once. A compared field
/// whose value Imprint echoed exactly as sent is left out (`accepted` holds it), and so are
/// the card statuses (`statuses` holds them); what stays is what no other column holds:
/// Imprint's own fields and every value it holds otherwise than sent, however slightly (a
/// case changed). `metadata` is left out only when Imprint's is the object sent, key for
/// key; otherwise it stays whole. A compared field this request did not send and Imprint did
/// not return is stored as `null` (`address: null` for no address at all), so that it never
/// reads as echoed. `accepted` overlaid with `response` (`address` key by key, `metadata`
/// whole) is the object Imprint answered, but for a sent field it left out, which `drift`
/// names.
pub fn stored_response(
    sent: &Map<String, Value>,
    imprint: Box<Customer>,
    keep_sensitive: bool,
) -> String {
    let mut object = imprint.into_stored(keep_sensitive);
    if let Some(fields) = object.as_object_mut() {
        fields.remove("statuses");
        let address = fields.get("address").and_then(Value::as_object);
        let had_address = address.is_some();
        let had_empty_address = address.is_some_and(Map::is_empty);
        for (name, place, _) in COMPARED {
            let want = sent.get(name).filter(|v| !v.is_null());
            let holder = match place {
                Place::Top | Place::Metadata => Some(&mut *fields),
                Place::Address if had_address => {
                    fields.get_mut("address").and_then(Value::as_object_mut)
                }
                // No address in the answer: one `address: null` says so for every field.
                Place::Address => {
                    if want.is_none() {
                        fields.insert("address".into(), Value::Null);
                    }
                    continue;
                }
            };
            let Some(holder) = holder else { continue };
            match (want, holder.get(name)) {
                (Some(want), Some(have)) if have == want => {
                    holder.remove(name);
                }
                (None, None) => {
                    holder.insert(name.into(), Value::Null);
                }
                _ => {}
            }
        }
        // An address every field of which was echoed as sent.
        if had_address
            && !had_empty_address
            && fields
                .get("address")
                .and_then(Value::as_object)
                .is_some_and(Map::is_empty)
        {
            fields.remove("address");
        }
    }
    crate::imprint::model::json_text(&object)
}

fn same(rule: Rule, want: &Value, have: Option<&Value>) -> bool {
    let Some(have) = have.filter(|v| !v.is_null()) else {
        return false;
    };
    match (rule, want.as_str(), have.as_str()) {
        (Rule::Email | Rule::Code, Some(a), Some(b)) => a.trim().eq_ignore_ascii_case(b.trim()),
        (Rule::Phone, Some(a), Some(b)) => {
            phone_digits(a).is_some_and(|d| Some(d) == phone_digits(b))
        }
        _ => want == have,
    }
}

/// The digits of a phone number written in any of the usual ways (`+`, spaces, dashes, dots,
/// parentheses); `None` when anything else is in it.
fn phone_digits(v: &str) -> Option<String> {
    let mut digits = String::with_capacity(v.len());
    for (i, c) in v.trim().chars().enumerate() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if i == 0 => {}
            ' ' | '-' | '.' | '(' | ')' => {}
            _ => return None,
        }
    }
    (!digits.is_empty()).then_some(digits)
}

/// Every key the partner sent has the same value in Imprint's metadata.
fn metadata_in_step(want: &Value, have: Option<&Value>) -> bool {
    let Some(want) = want.as_object() else {
        return have == Some(want);
    };
    let have = have.and_then(Value::as_object);
    want.iter()
        .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn customer(v: Value) -> Customer {
        let mut v = v;
        v["id"] = json!("C1");
        serde_json::from_value(v).expect("a customer object")
    }

    fn drift(accepted: Value, imprint: Value) -> Vec<&'static str> {
        drifted_fields(accepted.as_object().unwrap(), &customer(imprint))
    }

    #[test]
    fn the_comparison_follows_the_mapping_rules() {
        let full = json!({
            "email": "Ada@Example.com", "phone": "+1 (415) 555-0100", "first_name": "Ada",
            "last_name": "Lovelace", "preferred_language": "EN",
            "address": {"street_line1": "1 Main St", "city": "Springfield", "state": "IL",
                        "postal_code": "62701", "country": "usa"},
            "metadata": {"segment": "gold", "imprint_only": 1},
        });
        let cases: [(&str, Value, Value, Vec<&str>); 10] = [
            (
                "same values, written differently where the mapping allows",
                json!({"email": "ada@example.com", "phone": "+14155550100", "first_name": "Ada",
                       "last_name": "Lovelace", "preferred_language": "en",
                       "street_line1": "1 Main St", "city": "Springfield", "state": "IL",
                       "postal_code": "62701", "country": "USA", "metadata": {"segment": "gold"}}),
                full.clone(),
                vec![],
            ),
            (
                "a field never sent is not compared (NULL in the newest profile)",
                json!({"email": null, "first_name": "Ada"}),
                full.clone(),
                vec![],
            ),
            (
                "customer_history-only fields are not in the object: not compared",
                json!({"ltv_amount": 100, "loyalty_tier": "GOLD", "account_tenure": 3}),
                full.clone(),
                vec![],
            ),
            (
                "a changed name and city",
                json!({"first_name": "Ada", "last_name": "Byron", "city": "Shelbyville"}),
                full.clone(),
                vec!["last_name", "city"],
            ),
            (
                "a different phone number",
                json!({"phone": "+14155550199"}),
                full.clone(),
                vec!["phone"],
            ),
            (
                "a phone without the plus is the same E.164 number",
                json!({"phone": "+14155550100"}),
                json!({"phone": "14155550100"}),
                vec![],
            ),
            (
                "a field Imprint no longer holds",
                json!({"email": "ada@example.com", "street_line2": "Apt 4"}),
                json!({"address": {}}),
                vec!["email", "street_line2"],
            ),
            (
                "a metadata key changed at Imprint",
                json!({"metadata": {"segment": "silver"}}),
                full.clone(),
                vec!["metadata"],
            ),
            (
                "names are compared exactly",
                json!({"first_name": "ada"}),
                full.clone(),
                vec!["first_name"],
            ),
            (
                "another country",
                json!({"country": "CAN"}),
                full.clone(),
                vec!["country"],
            ),
        ];
        for (case, accepted, imprint, want) in cases {
            assert_eq!(drift(accepted, imprint), want, "{case}");
        }
    }
}
