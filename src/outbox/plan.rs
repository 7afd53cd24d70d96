//! The work a statement did, read from its `EXPLAIN (ANALYZE, FORMAT JSON)` output: the
//! claim's cost must follow the batch, not the backlog or the planner's statistics (G9), and
//! this is the measure tests and the benchmark hold it to (time is not: it varies by machine).

use serde_json::Value;
use sqlx::postgres::PgArguments;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Postgres, Row};

/// A statement of the outbox with its parameters bound.
pub(crate) type Query<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// The planner settings of the hot path's transactions (the claim, the write-back): every
/// step is an index look-up driven by the batch, and these keep the planner from trading one
/// for a scan or a hash of a whole index on a bad estimate, whatever the statistics say. A
/// plan costed with them looks expensive enough for JIT, which would compile it on every
/// call (~300 ms for the claim's merge): off too, whatever pool the statement runs on.
pub(crate) const INDEXES_ONLY: &str = "SET LOCAL enable_seqscan = off;
    SET LOCAL enable_bitmapscan = off; SET LOCAL enable_hashjoin = off;
    SET LOCAL enable_mergejoin = off; SET LOCAL jit = off";

/// Runs `sql` with the parameters `bind` gives it in a transaction of its own under
/// [`INDEXES_ONLY`]; with `measure`, first under `EXPLAIN ANALYZE` with the generic plan a
/// prepared statement may settle on after a few executions (its estimates do not see the
/// arrays' sizes: the plan that must stay bounded). Returns the rows and the plan's work
/// (0 unless measured).
pub(crate) async fn fetch_on_indexes<'q>(
    pool: &PgPool,
    sql: &'q str,
    bind: impl Fn(Query<'q>) -> Query<'q>,
    measure: bool,
) -> sqlx::Result<(Vec<PgRow>, f64)> {
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(INDEXES_ONLY).execute(&mut *tx).await?;
    let work = if measure {
        sqlx::raw_sql("SET LOCAL plan_cache_mode = force_generic_plan")
            .execute(&mut *tx)
            .await?;
        self::measure(&mut tx, sql, &bind).await?
    } else {
        0.0
    };
    let rows = bind(sqlx::query(sqlx::AssertSqlSafe(sql)))
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((rows, work))
}

/// The work of `sql`, with the parameters `bind` gives it, run under
/// `EXPLAIN (ANALYZE, FORMAT JSON)` inside a savepoint that is rolled back: its effects are
/// undone, its plan's work is returned.
pub(crate) async fn measure<'q>(
    conn: &mut PgConnection,
    sql: &str,
    bind: impl FnOnce(Query<'q>) -> Query<'q>,
) -> sqlx::Result<f64> {
    sqlx::raw_sql("SAVEPOINT explain")
        .execute(&mut *conn)
        .await?;
    let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {sql}");
    let plan: Value = bind(sqlx::query(sqlx::AssertSqlSafe(explain)))
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    sqlx::raw_sql("ROLLBACK TO SAVEPOINT explain")
        .execute(&mut *conn)
        .await?;
    Ok(work(&plan))
}

/// Sum over every plan node of (rows produced + rows removed by filters, join filters and
/// index rechecks) × loops. Takes the whole `EXPLAIN (ANALYZE, FORMAT JSON)` result (an array
/// of one object with a `Plan`), a single `{ "Plan": … }` object, or a plan node.
pub fn work(explain: &Value) -> f64 {
    match explain {
        Value::Array(items) => items.iter().map(work).sum(),
        Value::Object(o) => match o.get("Plan") {
            Some(plan) => node(plan),
            None => node(explain),
        },
        _ => 0.0,
    }
}

fn node(plan: &Value) -> f64 {
    let n = |key: &str| plan.get(key).and_then(Value::as_f64).unwrap_or(0.0);
    let own = (n("Actual Rows")
        + n("Rows Removed by Filter")
        + n("Rows Removed by Join Filter")
        + n("Rows Removed by Index Recheck"))
        * n("Actual Loops").max(1.0);
    let children: f64 = plan
        .get("Plans")
        .and_then(Value::as_array)
        .map(|ps| ps.iter().map(node).sum())
        .unwrap_or(0.0);
    own + children
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sums_rows_and_removed_rows_times_loops_over_every_node() {
        let explain = json!([{ "Plan": {
            "Node Type": "Nested Loop", "Actual Rows": 10.0, "Actual Loops": 1.0,
            "Rows Removed by Join Filter": 5.0,
            "Plans": [
                { "Node Type": "Seq Scan", "Actual Rows": 10.0, "Actual Loops": 1.0,
                  "Rows Removed by Filter": 90.0 },
                { "Node Type": "Index Scan", "Actual Rows": 1.0, "Actual Loops": 10.0 }
            ]
        }}]);
        assert_eq!(work(&explain), 15.0 + 100.0 + 10.0);
    }
}
