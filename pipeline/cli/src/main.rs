//! `eventflow`: one binary for every EventFlow service and operation (CONTRACT.md §6).
//!
//! Parses the command line, loads the configuration, starts telemetry and calls into the
//! pipeline crates; nothing here knows how facts are counted.

mod config;
mod simulate;
mod telemetry;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::NaiveDate;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use eventflow_aggregate::maintenance::MaintenanceConfig;
use eventflow_aggregate::{backfill, reconcile, ProcessorDeps, ProcessorMetrics, ProcessorStatus};
use eventflow_collect::CollectorDeps;
use eventflow_serve::ApiDeps;
use eventflow_store::Store;
use eventflow_topics::embedded::EmbeddedBroker;

use crate::config::{Config, Loaded};

#[derive(Debug, Parser)]
#[command(name = "eventflow", version, about = "EventFlow: event and webinar statistics pipeline")]
struct Cli {
    /// Configuration file (TOML); `EVENTFLOW__SECTION__KEY` variables override it.
    #[arg(long, global = true, env = "EVENTFLOW_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the edge collector (POST /v1/collect, GET /r/{cid}, GET /v1/tracker.js).
    Collector,
    /// Run the stream processor (fact topics -> ClickHouse aggregates).
    Processor,
    /// Run the reader API and dashboard.
    Api,
    /// Apply sql/ to ClickHouse and create the Kafka topics that are missing.
    Migrate {
        /// Only ClickHouse.
        #[arg(long)]
        skip_kafka: bool,
        /// Apply the cluster variant of the schema (sql/cluster/) to this ClickHouse cluster
        /// (default: clickhouse.cluster).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Recompute aggregates from raw facts for a date range, a client or a campaign link.
    Backfill {
        #[arg(long)]
        from: NaiveDate,
        #[arg(long)]
        to: NaiveDate,
        #[arg(long)]
        client: Option<String>,
        /// Only the marketing rows of this campaign link id.
        #[arg(long)]
        cid: Option<String>,
        /// Days recounted per step.
        #[arg(long, default_value_t = 7)]
        chunk_days: u32,
    },
    /// Compare aggregates with a raw recount; exit 1 on any mismatch.
    Reconcile {
        #[arg(long)]
        from: NaiveDate,
        #[arg(long)]
        to: NaiveDate,
        #[arg(long)]
        client: Option<String>,
    },
    /// Collector, processor and API in one process (embedded broker unless kafka.brokers is set).
    Dev,
    /// Send a realistic synthetic day of traffic to a collector over HTTP.
    Simulate(simulate::Args),
    /// Campaign-link metadata.
    Links {
        #[command(subcommand)]
        command: LinksCommand,
    },
    /// Print the `sha256:` form of an API token for the configuration file.
    HashToken { token: String },
}

#[derive(Debug, Subcommand)]
enum LinksCommand {
    /// Load links from a CSV file: cid,client_id,destination,utm_source,utm_medium,utm_campaign,utm_term,utm_content
    Import { file: PathBuf },
    /// List the links ClickHouse holds.
    List,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let loaded = match config::load(cli.config.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("eventflow: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    telemetry::init(&loaded.config.telemetry);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("eventflow: starting the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli.command, loaded)) {
        Ok(code) => code,
        Err(e) => {
            error!(error = format!("{e:#}"), "eventflow failed");
            eprintln!("eventflow: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Cancelled on SIGINT or SIGTERM.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    t.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        info!("shutdown requested");
        t.cancel();
    });
    token
}

async fn run(command: Command, loaded: Loaded) -> anyhow::Result<std::process::ExitCode> {
    let ok = std::process::ExitCode::SUCCESS;
    let cfg = loaded.config.clone();
    match command {
        Command::Collector => {
            let registry = prometheus::Registry::new();
            run_collector(&cfg, registry, shutdown_signal()).await?;
        }
        Command::Processor => {
            let registry = prometheus::Registry::new();
            run_processor(&cfg, registry, shutdown_signal(), true).await?;
        }
        Command::Api => {
            let registry = prometheus::Registry::new();
            run_api(&cfg, registry, shutdown_signal()).await?;
        }
        Command::Migrate { skip_kafka, cluster } => {
            migrate(&cfg, !skip_kafka, cluster.or(cfg.clickhouse.cluster.clone())).await?
        }
        Command::Backfill { from, to, client, cid, chunk_days } => {
            let store = Store::new(&cfg.clickhouse);
            let clients = cfg.clients()?;
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "backfill {bar:40} {pos}/{len} client days ({elapsed}, eta {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let req = backfill::BackfillRequest { from, to, client, cid, chunk_days };
            let report = backfill::run(&store, &clients, &req, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .await?;
            bar.finish();
            println!(
                "backfilled {} client days: {} rows written ({} stale rows zeroed, {} facts re-attributed)",
                report.client_days, report.rows_written, report.rows_zeroed, report.facts_reattributed
            );
        }
        Command::Reconcile { from, to, client } => return reconcile_cmd(&cfg, from, to, client).await,
        Command::Dev => dev(loaded).await?,
        Command::Simulate(args) => simulate::run(&cfg, args).await?,
        Command::Links { command } => links(&cfg, command).await?,
        Command::HashToken { token } => {
            println!("{}", eventflow_serve::auth::Tokens::hash_for_config(&token))
        }
    }
    Ok(ok)
}

fn lateness_ms(cfg: &Config) -> anyhow::Result<i64> {
    Ok(cfg.processor.allowed_lateness_ms()?)
}

async fn run_collector(
    cfg: &Config,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(&cfg.collector.listen).await.with_context(|| format!("binding {}", cfg.collector.listen))?;
    let deps = CollectorDeps {
        config: cfg.collector.clone(),
        kafka: cfg.kafka.clone(),
        clients: Arc::new(cfg.clients()?),
        store: Some(Store::new(&cfg.clickhouse)),
        registry,
        allowed_lateness_ms: lateness_ms(cfg)?,
    };
    eventflow_collect::serve(listener, deps, shutdown).await?;
    Ok(())
}

async fn run_api(cfg: &Config, registry: prometheus::Registry, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&cfg.api.listen).await.with_context(|| format!("binding {}", cfg.api.listen))?;
    let deps = ApiDeps {
        config: cfg.api.clone(),
        store: Store::new(&cfg.clickhouse),
        clients: Arc::new(cfg.clients()?),
        registry,
        partitions: usize::try_from(cfg.kafka.partitions).unwrap_or(1),
    };
    eventflow_serve::serve(listener, deps, shutdown).await?;
    Ok(())
}

async fn run_processor(
    cfg: &Config,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
    own_http: bool,
) -> anyhow::Result<()> {
    let kafka = cfg.kafka.clone();
    let partitions = tokio::task::spawn_blocking(move || eventflow_topics::admin::fact_partitions(&kafka))
        .await?
        .context("the fact topics are missing or not co-partitioned (run `eventflow migrate`)")?;
    info!(partitions, "fact topics found");
    let store = Store::new(&cfg.clickhouse);
    let metrics = ProcessorMetrics::new(&registry)?;
    let status = Arc::new(ProcessorStatus::default());
    let clients = Arc::new(cfg.clients()?);
    let deps = ProcessorDeps {
        config: cfg.processor.clone(),
        kafka: cfg.kafka.clone(),
        store: Arc::new(store.clone()),
        clients: clients.clone(),
        metrics: metrics.clone(),
        status: status.clone(),
        partitions,
        runtime: tokio::runtime::Handle::current(),
    };
    let loop_shutdown = shutdown.clone();
    let consumer = std::thread::Builder::new()
        .name("processor".into())
        .spawn(move || eventflow_aggregate::run(deps, loop_shutdown))?;
    let ms = |v: anyhow::Result<i64>| v.map(|m| Duration::from_millis(u64::try_from(m).unwrap_or(0)));
    let maintenance = MaintenanceConfig {
        fold_every: ms(cfg.processor.fold_late_interval_ms().map_err(Into::into))?,
        reconcile_every: ms(cfg.processor.reconcile_interval_ms().map_err(Into::into))?,
        reconcile_days: cfg.processor.reconcile_days,
    };
    let background =
        tokio::spawn(eventflow_aggregate::maintenance::run(store, clients, metrics, maintenance, shutdown.clone()));
    if own_http {
        let listener = TcpListener::bind(&cfg.processor.listen)
            .await
            .with_context(|| format!("binding {}", cfg.processor.listen))?;
        info!(addr = %cfg.processor.listen, "processor health and metrics listening");
        tokio::spawn(eventflow_aggregate::http::serve(listener, registry, status, shutdown.clone()));
    }
    let result = tokio::task::spawn_blocking(move || consumer.join()).await?;
    shutdown.cancel();
    let _ = background.await;
    match result {
        Ok(r) => r,
        Err(_) => anyhow::bail!("processor thread panicked"),
    }
}

async fn migrate(cfg: &Config, kafka: bool, cluster: Option<String>) -> anyhow::Result<()> {
    let report = match &cluster {
        Some(name) => eventflow_store::migrate::apply_cluster(&cfg.clickhouse, name)
            .await
            .with_context(|| format!("migrating ClickHouse cluster {name} through {}", cfg.clickhouse.url))?,
        None => eventflow_store::migrate::apply(&cfg.clickhouse)
            .await
            .with_context(|| format!("migrating ClickHouse at {} (is it running?)", cfg.clickhouse.url))?,
    };
    println!(
        "clickhouse {}: applied {:?}, already applied {:?}",
        cfg.clickhouse.database, report.applied, report.already_applied
    );
    if kafka {
        let topics = eventflow_topics::admin::ensure_topics(&cfg.kafka)
            .await
            .with_context(|| format!("creating Kafka topics on {}", cfg.kafka.brokers))?;
        println!("kafka {}: created {:?}, existing {:?}", cfg.kafka.brokers, topics.created, topics.existing);
    }
    Ok(())
}

async fn reconcile_cmd(
    cfg: &Config,
    from: NaiveDate,
    to: NaiveDate,
    client: Option<String>,
) -> anyhow::Result<std::process::ExitCode> {
    let store = Store::new(&cfg.clickhouse);
    let clients = cfg.clients()?;
    let ids = match client {
        Some(c) => vec![c],
        None => store.clients_with_facts(from, to).await?,
    };
    let mut total = 0usize;
    for id in &ids {
        let checked_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        let mismatches = reconcile::client(&store, id, clients.timezone(id), from, to).await?;
        for m in &mismatches {
            println!("MISMATCH {m}");
        }
        // Days found clean end a doubt the continuous reconcile recorded (the overview's
        // meta.doubt), also for days it no longer checks. Differences are left to the continuous
        // reconcile, which confirms them with a second pass before recording them.
        let clean: Vec<_> = reconcile::findings(id, from, to, checked_ms, &mismatches)
            .into_iter()
            .filter(|f| f.mismatches == 0)
            .collect();
        if let Err(e) = store.record_reconcile_findings(&clean).await {
            eprintln!("warning: could not record the days found clean for {id}: {e}");
        }
        let days = (to - from).num_days() + 1;
        if mismatches.is_empty() {
            println!("{id}: {days} days match");
        } else {
            println!("{id}: {} differing figures over {days} days", mismatches.len());
        }
        total += mismatches.len();
    }
    Ok(if total == 0 { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) })
}

async fn dev(loaded: Loaded) -> anyhow::Result<()> {
    let mut cfg = loaded.config;
    if cfg.clients.is_empty() && !cfg.tenancy.allow_unknown_clients {
        // A first run without any [clients]: every client id is welcome (a deployment lists
        // its clients; unknown ones are refused there by default).
        info!("dev: no [clients] configured; accepting facts of any client id");
        cfg.tenancy.allow_unknown_clients = true;
    }
    let mut _broker = None;
    if loaded.explicit_brokers {
        info!(brokers = %cfg.kafka.brokers, "dev: using the configured Kafka");
    } else {
        let broker = EmbeddedBroker::start(&cfg.kafka)?;
        cfg.kafka.brokers = broker.bootstrap_servers();
        info!(brokers = %cfg.kafka.brokers, "dev: embedded Kafka-protocol broker (in memory) started");
        _broker = Some(broker);
    }
    eventflow_store::migrate::apply(&cfg.clickhouse).await.with_context(|| {
        format!(
            "ClickHouse at {} is not reachable; start it (scripts/services.sh start) or set EVENTFLOW__CLICKHOUSE__URL",
            cfg.clickhouse.url
        )
    })?;
    if loaded.explicit_brokers {
        eventflow_topics::admin::ensure_topics(&cfg.kafka).await?;
    }
    let registry = prometheus::Registry::new();
    let shutdown = shutdown_signal();
    let (c, p, a) = tokio::join!(
        run_collector(&cfg, registry.clone(), shutdown.clone()),
        run_processor(&cfg, registry.clone(), shutdown.clone(), true),
        run_api(&cfg, registry.clone(), shutdown.clone()),
    );
    c?;
    p?;
    a?;
    Ok(())
}

async fn links(cfg: &Config, command: LinksCommand) -> anyhow::Result<()> {
    let store = Store::new(&cfg.clickhouse);
    match command {
        LinksCommand::Import { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let now = u32::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
            let mut rows = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') || (i == 0 && line.starts_with("cid,")) {
                    continue;
                }
                let f: Vec<&str> = line.split(',').map(str::trim).collect();
                if f.len() < 3 {
                    anyhow::bail!("{}:{}: expected cid,client_id,destination[,utm_source,utm_medium,utm_campaign,utm_term,utm_content]", file.display(), i + 1);
                }
                eventflow_core::ClientId::parse(f[1])
                    .with_context(|| format!("{}:{}: client_id", file.display(), i + 1))?;
                // `unresolved` is the label of facts whose link is unknown: a link of that name
                // would make them indistinguishable.
                if f[0].is_empty() || f[0] == eventflow_core::fact::UNRESOLVED {
                    anyhow::bail!(
                        "{}:{}: cid must be non-empty and not `{}`",
                        file.display(),
                        i + 1,
                        eventflow_core::fact::UNRESOLVED
                    );
                }
                let g = |k: usize| f.get(k).map(|s| (*s).to_owned()).unwrap_or_default();
                rows.push(eventflow_store::rows::CampaignLinkRow {
                    cid: g(0),
                    client_id: g(1),
                    destination: g(2),
                    utm_source: g(3),
                    utm_medium: g(4),
                    utm_campaign: g(5),
                    utm_term: g(6),
                    utm_content: g(7),
                    updated_at: now,
                });
            }
            store.upsert_campaign_links(&rows).await?;
            println!("imported {} campaign links", rows.len());
        }
        LinksCommand::List => {
            for l in store.campaign_links().await? {
                println!(
                    "{}\t{}\t{}\t{}/{}/{}",
                    l.cid, l.client_id, l.destination, l.utm_source, l.utm_medium, l.utm_campaign
                );
            }
        }
    }
    Ok(())
}
