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
    Migration { name: "005_reconcile_findings", sql: include_str!("../../../sql/005_reconcile_findings.sql") },
];

/// The cluster variant (`sql/cluster/`), applied by `eventflow migrate --cluster NAME` after
/// replacing `{cluster}` and `{database}`.
pub const CLUSTER_MIGRATIONS: &[Migration] = &[
    Migration { name: "cluster/001_facts", sql: include_str!("../../../sql/cluster/001_facts.sql") },
    Migration { name: "cluster/002_aggregates", sql: include_str!("../../../sql/cluster/002_aggregates.sql") },
    Migration { name: "cluster/003_operations", sql: include_str!("../../../sql/cluster/003_operations.sql") },
    Migration {
        name: "cluster/005_reconcile_findings",
        sql: include_str!("../../../sql/cluster/005_reconcile_findings.sql"),
    },
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

/// Applies the cluster variant of the schema to `cluster` (every statement is
/// `IF NOT EXISTS ... ON CLUSTER`, so re-running is harmless; nothing is recorded per host).
pub async fn apply_cluster(config: &ClickHouseConfig, cluster: &str) -> Result<Report> {
    let valid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid(cluster) || !valid(&config.database) {
        return Err(StoreError::Invalid("cluster and database names must be [A-Za-z0-9_-]+".into()));
    }
    let client = config.client();
    let mut report = Report::default();
    for migration in CLUSTER_MIGRATIONS {
        let sql = migration.sql.replace("{cluster}", cluster).replace("{database}", &config.database);
        for stmt in statements(&sql) {
            client
                .query(&stmt)
                .execute()
                .await
                .map_err(|source| StoreError::Migration { name: migration.name.to_owned(), source })?;
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
        let total: usize = MIGRATIONS.iter().map(|m| statements(m.sql).len()).sum();
        assert_eq!(total, 12, "one CREATE TABLE per table");
    }
}
