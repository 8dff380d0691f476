//! `eventflow migrate`: applies the SQL files of `sql/` in order.
//!
//! The files are compiled into the binary, so the binary alone can migrate any server. Every
//! statement is idempotent (`IF NOT EXISTS`), and applied migrations are recorded in
//! `schema_migrations`, so running migrate twice, or from two hosts, is harmless.

use crate::{ClickHouseConfig, Result, StoreError};

/// A migration file: its name (file stem) and SQL text.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
}

/// The single-server schema, in order. `tests::every_sql_file_is_listed` keeps this in sync.
pub const MIGRATIONS: &[Migration] = &[
    Migration { name: "001_facts", sql: include_str!("../../../sql/001_facts.sql") },
    Migration { name: "002_aggregates", sql: include_str!("../../../sql/002_aggregates.sql") },
    Migration { name: "003_operations", sql: include_str!("../../../sql/003_operations.sql") },
    Migration { name: "004_exact_dedup", sql: include_str!("../../../sql/004_exact_dedup.sql") },
    Migration { name: "005_reconcile_findings", sql: include_str!("../../../sql/005_reconcile_findings.sql") },
    Migration { name: "007_link_clicks", sql: include_str!("../../../sql/007_link_clicks.sql") },
];

/// The cluster variant (`sql/cluster/`), applied by `eventflow migrate --cluster NAME` after
/// replacing `{cluster}` and `{database}`.
pub const CLUSTER_MIGRATIONS: &[Migration] = &[
    Migration { name: "cluster/001_facts", sql: include_str!("../../../sql/cluster/001_facts.sql") },
    Migration { name: "cluster/002_aggregates", sql: include_str!("../../../sql/cluster/002_aggregates.sql") },
    Migration { name: "cluster/003_operations", sql: include_str!("../../../sql/cluster/003_operations.sql") },
    Migration { name: "cluster/004_exact_dedup", sql: include_str!("../../../sql/cluster/004_exact_dedup.sql") },
    Migration {
        name: "cluster/005_reconcile_findings",
        sql: include_str!("../../../sql/cluster/005_reconcile_findings.sql"),
    },
    Migration { name: "cluster/007_link_clicks", sql: include_str!("../../../sql/cluster/007_link_clicks.sql") },
];

/// Splits a migration file into statements: `--` comment lines are dropped and statements end
/// with `;` at the end of a line (no statement in `sql/` has a `;` inside a string).
pub fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("--") || trimmed.is_empty() {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if trimmed.ends_with(';') {
            let stmt = current.trim().trim_end_matches(';').trim().to_owned();
            if !stmt.is_empty() {
                out.push(stmt);
            }
            current.clear();
        }
    }
    let rest = current.trim();
    if !rest.is_empty() {
        out.push(rest.to_owned());
    }
    out
}

/// Outcome of [`apply`].
#[derive(Debug, Default)]
pub struct Report {
    pub applied: Vec<&'static str>,
    pub already_applied: Vec<&'static str>,
}

/// Creates the database and applies every migration not yet recorded.
pub async fn apply(config: &ClickHouseConfig) -> Result<Report> {
    let root = config.client();
    let db = &config.database;
    let fail = |name: &str| {
        let name = name.to_owned();
        move |source| StoreError::Migration { name, source }
    };
    root.query(&format!("CREATE DATABASE IF NOT EXISTS {}", quote_ident(db)))
        .execute()
        .await
        .map_err(fail("create database"))?;
    let client = config.client().with_database(db);
    client
        .query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (name String, applied_at DateTime) \
             ENGINE = ReplacingMergeTree ORDER BY name",
        )
        .execute()
        .await
        .map_err(fail("schema_migrations"))?;
    let done: Vec<String> = client
        .query("SELECT DISTINCT name FROM schema_migrations")
        .fetch_all::<String>()
        .await
        .map_err(fail("schema_migrations"))?;

    let mut report = Report::default();
    for migration in MIGRATIONS {
        if done.iter().any(|n| n == migration.name) {
            report.already_applied.push(migration.name);
            continue;
        }
        for stmt in statements(migration.sql) {
            if done_already(&client, db, &stmt).await.map_err(fail(migration.name))? {
                continue;
            }
            client.query(&stmt).execute().await.map_err(fail(migration.name))?;
        }
        client
            .query("INSERT INTO schema_migrations (name, applied_at) SELECT ?, now()")
            .bind(migration.name)
            .execute()
            .await
            .map_err(fail(migration.name))?;
        report.applied.push(migration.name);
    }
    Ok(report)
}

/// Whether `stmt` has nothing left to do: an `ALTER TABLE t ADD COLUMN c` whose column exists
/// (18.16 has no `ADD COLUMN IF NOT EXISTS`), or an `INSERT ... SELECT ... FROM t` whose source
/// table is gone (a data move whose source a later statement of the same file dropped). This
/// makes every migration statement safe to run again after a partial failure.
async fn done_already(
    client: &clickhouse::Client,
    database: &str,
    stmt: &str,
) -> Result<bool, clickhouse::error::Error> {
    let words: Vec<&str> = stmt.split_whitespace().collect();
    let table_of = |name: &str| -> (String, String) {
        match name.split_once('.') {
            Some((db, t)) => (db.to_owned(), t.to_owned()),
            None => (database.to_owned(), name.to_owned()),
        }
    };
    if words.len() > 2 && words[0] == "ALTER" && words[1] == "TABLE" {
        if let Some(at) = words.windows(2).position(|w| w == ["ADD", "COLUMN"]) {
            let (db, table) = table_of(words[2]);
            let column = words.get(at + 2).copied().unwrap_or_default().trim_matches('`');
            let n: u64 = client
                .query("SELECT count() FROM system.columns WHERE database = ? AND table = ? AND name = ?")
                .bind(db)
                .bind(table)
                .bind(column)
                .fetch_one()
                .await?;
            return Ok(n > 0);
        }
    }
    if words.first() == Some(&"INSERT") {
        if let Some(at) = words.iter().rposition(|w| *w == "FROM") {
            let (db, table) = table_of(words.get(at + 1).copied().unwrap_or_default());
            let n: u64 = client
                .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
                .bind(db)
                .bind(table)
                .fetch_one()
                .await?;
            return Ok(n == 0);
        }
    }
    Ok(false)
}

/// Applies the cluster variant of the schema to `cluster` (every statement is
/// `IF NOT EXISTS ... ON CLUSTER` or skipped when done, so re-running is harmless; nothing is
/// recorded per host). A data move (`INSERT ... SELECT`) runs again on a second run while its
/// source still exists; its target is a ReplacingMergeTree, so the copy is folded.
pub async fn apply_cluster(config: &ClickHouseConfig, cluster: &str) -> Result<Report> {
    let valid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid(cluster) || !valid(&config.database) {
        return Err(StoreError::Invalid("cluster and database names must be [A-Za-z0-9_-]+".into()));
    }
    let client = config.client();
    let mut report = Report::default();
    for migration in CLUSTER_MIGRATIONS {
        let sql = migration.sql.replace("{cluster}", cluster).replace("{database}", &config.database);
        let fail = |source| StoreError::Migration { name: migration.name.to_owned(), source };
        for stmt in statements(&sql) {
            if done_already(&client, &config.database, &stmt).await.map_err(fail)? {
                continue;
            }
            client.query(&stmt).execute().await.map_err(fail)?;
        }
        report.applied.push(migration.name);
    }
    Ok(report)
}

/// Quotes a ClickHouse identifier with backticks.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sql_file_is_listed() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../sql");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .map(|n| n.trim_end_matches(".sql").to_owned())
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS.iter().map(|m| m.name.to_owned()).collect();
        assert_eq!(files, listed);
        let mut cluster: Vec<String> = std::fs::read_dir(format!("{dir}/cluster"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .map(|n| format!("cluster/{}", n.trim_end_matches(".sql")))
            .collect();
        cluster.sort();
        assert_eq!(cluster, CLUSTER_MIGRATIONS.iter().map(|m| m.name.to_owned()).collect::<Vec<_>>());
    }

    #[test]
    fn splits_statements_and_drops_comments() {
        let sql = "-- a comment; with a semicolon\nCREATE TABLE a\n(x UInt8)\nENGINE = Log;\n\nCREATE TABLE b (y UInt8) ENGINE = Log;\n";
        assert_eq!(
            statements(sql),
            vec!["CREATE TABLE a\n(x UInt8)\nENGINE = Log", "CREATE TABLE b (y UInt8) ENGINE = Log"]
        );
        let all: Vec<String> = MIGRATIONS.iter().flat_map(|m| statements(m.sql)).collect();
        for stmt in &all {
            assert!(
                ["CREATE TABLE IF NOT EXISTS ", "ALTER TABLE ", "INSERT INTO ", "DROP TABLE IF EXISTS "]
                    .iter()
                    .any(|p| stmt.starts_with(p)),
                "{stmt}"
            );
        }
        let creates = all.iter().filter(|s| s.starts_with("CREATE TABLE")).count();
        assert_eq!(creates, 19, "one CREATE TABLE per table ever created");
    }
}
