//! Dead letters: the failed rows an operator lists (`imprint-sync failed`) and picks for a
//! replay. Only ids, codes, statuses and times leave this module; never a personal value.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgPool, Row};

/// One failed row, as `failed` lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub customer_id: String,
    pub error_code: String,
    /// Names the field or the API's answer, never a value (see `worker` and `profile`); a
    /// message an older version wrote with a value in it is shown with the value cut out.
    pub last_error: Option<String>,
    pub last_http_status: Option<i32>,
    pub attempts: i32,
    pub updated_at: DateTime<Utc>,
}

/// The row's own personal columns, selected as `personal` next to `last_error`: a message
/// written by an older version, or quoting an API that echoed the refused value, may hold
/// one of them, and `failed` must not print it. Read only by [`DeadLetter::from_row`].
pub const PERSONAL: &str = "ARRAY[o.email, o.phone, o.first_name, o.last_name, o.street_line1,
                                 o.street_line2, o.city, o.postal_code] AS personal";

impl<'r> FromRow<'r, PgRow> for DeadLetter {
    fn from_row(row: &'r PgRow) -> sqlx::Result<Self> {
        let personal: Vec<Option<String>> = row.try_get("personal")?;
        let last_error: Option<String> = row.try_get("last_error")?;
        Ok(Self {
            id: row.try_get("id")?,
            customer_id: row.try_get("customer_id")?,
            error_code: row.try_get("error_code")?,
            last_error: last_error.map(|m| redact(&m, &personal)),
            last_http_status: row.try_get("last_http_status")?,
            attempts: row.try_get("attempts")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

/// What `failed` puts in place of a personal value.
const REDACTED: &str = "[redacted]";

/// A message without the row's own personal values, nor anything shaped like an e-mail
/// address or a phone number (the API may echo a value normalised: another case, E.164).
pub fn redact(message: &str, personal: &[Option<String>]) -> String {
    let mut out = message.to_owned();
    for value in personal.iter().flatten().map(|v| v.trim()) {
        // One letter would cut field names apart; it identifies no one.
        if value.chars().count() >= 2 {
            out = out.replace(value, REDACTED);
        }
    }
    let words: Vec<&str> = out
        .split(' ')
        .map(|word| if word.contains('@') { REDACTED } else { word })
        .collect();
    without_numbers(&words.join(" "))
}

/// Cuts out each run of digits and phone punctuation that holds 7 digits or more (a phone
/// number however written); status codes, attempts and counts stay.
fn without_numbers(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.chars().filter(char::is_ascii_digit).count() >= 7 {
            let core = run.trim();
            let (lead, trail) = run.split_once(core).unwrap_or((run.as_str(), ""));
            out.push_str(lead);
            out.push_str(REDACTED);
            out.push_str(trail);
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in s.chars() {
        if c.is_ascii_digit() || " +-.()".contains(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redaction_cuts_values_and_keeps_field_names_and_codes() {
        let row = [
            Some("grace.hopper@example.com".into()),
            Some("Grace".into()),
            None,
        ];
        for (message, want) in [
            (
                "bad email Grace.Hopper@Example.com (Grace)",
                "bad email [redacted] ([redacted])",
            ),
            (
                "phone +1 (415) 555-0123 not valid",
                "phone [redacted] not valid",
            ),
            (
                "the API answered 404 after 3 attempts: param postal_code",
                "the API answered 404 after 3 attempts: param postal_code",
            ),
        ] {
            assert_eq!(redact(message, &row), want, "{message}");
        }
    }
}

/// A page of dead letters: `total` counts every match, `rows` honours the limit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetters {
    pub total: i64,
    pub rows: Vec<DeadLetter>,
}

/// The filters as SQL binds: NULL means "not given", so one static statement serves every
/// combination and the planner sees no string-built SQL.
#[derive(Debug, Default)]
pub struct Binds {
    pub codes: Option<Vec<String>>,
    pub customers: Option<Vec<String>>,
    pub since_seconds: Option<f64>,
    pub ids: Option<Vec<i64>>,
}

/// The condition a failed row `o` must meet, binds $1..$4 in [`Binds`] order. A row with no
/// error code counts as `unknown`, as `status` shows it.
pub const MATCHES: &str = "($1::text[] IS NULL OR COALESCE(o.last_error_code, 'unknown') = ANY($1))
      AND ($2::text[] IS NULL OR o.customer_id = ANY($2))
      AND ($3::float8 IS NULL OR o.updated_at >= now() - $3 * interval '1 second')
      AND ($4::int8[] IS NULL OR o.id = ANY($4))";

/// Binds [`Binds`] to a statement that uses [`MATCHES`].
pub fn bind<'q, O>(
    q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    b: &Binds,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    q.bind(b.codes.clone())
        .bind(b.customers.clone())
        .bind(b.since_seconds)
        .bind(b.ids.clone())
}

/// Failed rows matching `filter`, newest first, at most `limit`; read through the partial
/// index on failed rows, so the cost follows the dead letters, not the history.
pub async fn list(pool: &PgPool, filter: &Binds, limit: u32) -> sqlx::Result<DeadLetters> {
    let sql = format!(
        "SELECT o.id, o.customer_id, COALESCE(o.last_error_code, 'unknown') AS error_code,
                o.last_error, o.last_http_status, o.attempts, o.updated_at, {PERSONAL},
                count(*) OVER () AS total
         FROM imprint_sync.customer_outbox o
         WHERE o.sync_status = 'failed' AND {MATCHES}
         ORDER BY o.updated_at DESC, o.id DESC
         LIMIT $5"
    );
    #[derive(FromRow)]
    struct Counted {
        #[sqlx(flatten)]
        row: DeadLetter,
        total: i64,
    }
    let found: Vec<Counted> = bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)), filter)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    let total = match found.first() {
        Some(c) => c.total,
        // The window count is lost with LIMIT 0 or past the last row: count alone.
        None if limit == 0 => count(pool, filter).await?,
        None => 0,
    };
    Ok(DeadLetters {
        total,
        rows: found.into_iter().map(|c| c.row).collect(),
    })
}

async fn count(pool: &PgPool, filter: &Binds) -> sqlx::Result<i64> {
    let sql = format!(
        "SELECT count(*) FROM imprint_sync.customer_outbox o
         WHERE o.sync_status = 'failed' AND {MATCHES}"
    );
    let (n,): (i64,) = bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)), filter)
        .fetch_one(pool)
        .await?;
    Ok(n)
}
