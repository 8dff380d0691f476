//! Real services for end-to-end and fault tests, started and stopped by the tests themselves.
//!
//! Every test gets a fresh data directory under `<repo>/.data/test/` and free loopback ports.
//! Services are killed when their handle drops (also when a test panics); the directory is
//! removed after a passing test and kept after a failing one (its path is printed). A service
//! that cannot start fails the test: nothing is skipped.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Root of the repository.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A free loopback port (bound and released), never one handed out before in this test process:
/// the kernel may give the same ephemeral port to two `bind(0)` calls in a row, and two
/// services of one deployment on one port make the second fail while the first answers for it.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port =
            TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port");
        if given.insert(port) {
            return port;
        }
    }
}

fn wait_tcp(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A test's private directory.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> Self {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = repo().join(".data").join("test").join(format!("{name}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).expect("creating test dir");
        Self { path }
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test data kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A child process killed on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Self {
        let out = fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err)).stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { name: name.to_owned(), child: Some(child), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (SIGKILL after `timeout`). The exit status when the process ended by
    /// itself within `timeout`, `None` when it had to be killed (or was not running).
    pub fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

// -------------------------------------------------------------------------------------------
// ClickHouse 18.16 (Debian's clickhouse-server)

pub struct ClickHouse {
    pub http_port: u16,
    tcp_port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl ClickHouse {
    pub fn binary() -> String {
        std::env::var("EVENTFLOW_CLICKHOUSE_SERVER").unwrap_or_else(|_| "/usr/sbin/clickhouse-server".into())
    }

    pub fn start(dir: &TestDir) -> Self {
        let mut ch =
            ClickHouse { http_port: free_port(), tcp_port: free_port(), dir: dir.join("clickhouse"), proc: None };
        ch.launch();
        ch
    }

    fn launch(&mut self) {
        let d = &self.dir;
        fs::create_dir_all(d.join("data")).expect("clickhouse dir");
        let config = format!(
            r#"<yandex>
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog><console>0</console></logger>
  <http_port>{http}</http_port>
  <tcp_port>{tcp}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <users_config>{d}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
"#,
            d = d.display(),
            http = self.http_port,
            tcp = self.tcp_port
        );
        let users = r#"<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users><default><password></password><networks><ip>::1</ip><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"#;
        fs::write(d.join("config.xml"), config).expect("clickhouse config");
        fs::write(d.join("users.xml"), users).expect("clickhouse users");
        let mut cmd = Command::new(Self::binary());
        cmd.arg(format!("--config-file={}", d.join("config.xml").display())).current_dir(d);
        self.proc = Some(Proc::spawn("clickhouse", cmd, d.join("stdout.log")));
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.query("SELECT 1").map(|r| r.trim() == "1").unwrap_or(false) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("ClickHouse did not start; see {}", d.join("error.log").display());
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Runs SQL over HTTP and returns the text result.
    pub fn query(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "30",
                "-w",
                "\n%{http_code}",
                &format!("{}/", self.url()),
                "--data-binary",
                sql,
            ])
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        if code == "200" {
            Ok(body.to_owned())
        } else {
            Err(format!("{code}: {body}"))
        }
    }

    /// Rows of `sql` as JSON objects (`FORMAT JSONEachRow` is appended). ClickHouse quotes
    /// 64-bit integers in JSON; [`col`] reads any column as text.
    pub fn json_rows(&self, sql: &str) -> Vec<Value> {
        let text = self.query(&format!("{sql} FORMAT JSONEachRow")).unwrap_or_else(|e| panic!("{sql}: {e}"));
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    }

    /// One number from a query.
    pub fn number(&self, sql: &str) -> u64 {
        let r = self.query(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        r.trim().parse().unwrap_or_else(|_| panic!("{sql}: not a number: {r:?}"))
    }

    /// Stops the server (SIGTERM) and starts it again on the same port and data.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(30));
        }
    }

    /// Kills the server (SIGKILL: no shutdown); [`Self::restart`] starts it again on the same
    /// data.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

// -------------------------------------------------------------------------------------------
// tansu (Kafka-protocol broker)

pub struct Tansu {
    pub port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
    /// Extra command-line arguments of `tansu broker` (e.g. a schema registry).
    extra: Vec<String>,
}

impl Tansu {
    pub fn binary() -> PathBuf {
        if let Ok(p) = std::env::var("EVENTFLOW_TANSU") {
            return PathBuf::from(p);
        }
        let cached = PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/eventflow/tools/bin/tansu");
        if cached.exists() {
            return cached;
        }
        PathBuf::from("tansu")
    }

    pub fn start(dir: &TestDir) -> Self {
        Self::start_with(dir, &[])
    }

    /// A broker started with extra `tansu broker` arguments.
    pub fn start_with(dir: &TestDir, extra: &[&str]) -> Self {
        let mut t = Tansu {
            port: free_port(),
            dir: dir.join("tansu"),
            proc: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        t.launch();
        t
    }

    fn launch(&mut self) {
        fs::create_dir_all(&self.dir).expect("tansu dir");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut cmd = Command::new(Self::binary());
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "sqlite://tansu.db",
        ])
        .args(&self.extra)
        .current_dir(&self.dir)
        .env("RUST_LOG", "warn");
        self.proc = Some(Proc::spawn("tansu", cmd, self.dir.join("tansu.log")));
        if !wait_tcp(self.port, Duration::from_secs(30)) {
            panic!("tansu did not start; see {}", self.dir.join("tansu.log").display());
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(15));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

// -------------------------------------------------------------------------------------------
// EventFlow processes

/// Ports and settings of one EventFlow deployment under test.
#[derive(Clone, Debug)]
pub struct Deployment {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub collector_port: u16,
    pub api_port: u16,
    pub processor_port: u16,
}

pub const ADMIN_TOKEN: &str = "admin-6fQ2xN9vLk3TpW8rZc5H";
pub const ACME_TOKEN: &str = "acme-Hb4Nq8Zr2VtK7xLm5Pw9";
pub const GLOBEX_TOKEN: &str = "globex-Jd3Rk7Yt1Fm9Xq5Ls8Bn";

impl Deployment {
    /// Writes a configuration for `clickhouse` and `brokers` (`extra` is appended verbatim).
    pub fn new(dir: &TestDir, clickhouse_url: &str, brokers: &str, partitions: u32, extra: &str) -> Self {
        let d = Deployment {
            dir: dir.path.clone(),
            config: dir.join("eventflow.toml"),
            collector_port: free_port(),
            api_port: free_port(),
            processor_port: free_port(),
        };
        let config = format!(
            r#"[collector]
listen = "127.0.0.1:{collector}"
spool_dir = "{dir}/spool"
rate_limit_per_ip = {{ per_second = 100000.0, burst = 100000.0 }}
fact_rate_limit_per_ip = {{ per_second = 1000000.0, burst = 1000000.0 }}
links_refresh = "1s"

[processor]
listen = "127.0.0.1:{processor}"
flush_interval = "300ms"
fold_late_interval = "2s"
reconcile_interval = "0s"
orphan_after = "8s"
rejoin_backoff = "10s"

[api]
listen = "127.0.0.1:{api}"
admin_token = "{admin}"
quality_refresh_secs = 1

[kafka]
brokers = "{brokers}"
partitions = {partitions}

[clickhouse]
url = "{ch}"
database = "eventflow"

[telemetry]
log_format = "json"
log_level = "info"

[clients.acme]
timezone = "Asia/Seoul"
token = "{acme}"

[clients.globex]
timezone = "America/New_York"
token = "{globex}"
{extra}
"#,
            collector = d.collector_port,
            processor = d.processor_port,
            api = d.api_port,
            dir = dir.path.display(),
            admin = ADMIN_TOKEN,
            ch = clickhouse_url,
            acme = Deployment::hash(ACME_TOKEN),
            globex = GLOBEX_TOKEN,
        );
        fs::write(&d.config, config).expect("writing config");
        d
    }

    fn hash(token: &str) -> String {
        let out =
            Command::new(env!("CARGO_BIN_EXE_eventflow")).args(["hash-token", token]).output().expect("hash-token");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn command(&self, args: &[&str]) -> Command {
        self.command_of(env!("CARGO_BIN_EXE_eventflow"), args)
    }

    fn command_of(&self, binary: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary);
        cmd.arg("--config").arg(&self.config).args(args).current_dir(&self.dir);
        cmd
    }

    /// Runs a one-shot subcommand; returns (exit code, stdout+stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String) {
        let out = self.command(args).output().expect("running eventflow");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }

    pub fn migrate(&self) {
        let (code, out) = self.run(&["migrate"]);
        assert_eq!(code, 0, "migrate failed: {out}");
    }

    /// `eventflow migrate --skip-kafka`: the ClickHouse schema only (tests without a broker).
    pub fn migrate_clickhouse_only(&self) {
        let (code, out) = self.run(&["migrate", "--skip-kafka"]);
        assert_eq!(code, 0, "migrate failed: {out}");
    }

    /// Starts a service subcommand and waits for its readiness endpoint.
    pub fn start(&self, service: &str) -> Proc {
        self.start_with(service, &[])
    }

    pub fn start_with(&self, service: &str, env: &[(&str, String)]) -> Proc {
        self.start_binary(env!("CARGO_BIN_EXE_eventflow"), service, env)
    }

    /// [`Deployment::start_with`] with another build of the `eventflow` binary.
    pub fn start_binary(&self, binary: &str, service: &str, env: &[(&str, String)]) -> Proc {
        let mut cmd = self.command_of(binary, &[service]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log = self.dir.join(format!("{service}-{}.log", free_port()));
        let mut p = Proc::spawn(service, cmd, log);
        let port = match service {
            "collector" => self.collector_port,
            "api" => self.api_port,
            _ => self.processor_port,
        };
        let port = env
            .iter()
            .find(|(k, _)| k.ends_with("__LISTEN"))
            .and_then(|(_, v)| v.rsplit(':').next()?.parse().ok())
            .unwrap_or(port);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if !p.is_running() {
                panic!("{service} exited during start:\n{}", p.log_text());
            }
            if http_status(&format!("http://127.0.0.1:{port}/readyz")) == Some(200) {
                // Still running a moment later: the answer was this service's, not another one's
                // on a port it could not bind.
                std::thread::sleep(Duration::from_millis(100));
                if !p.is_running() {
                    panic!("{service} exited during start:\n{}", p.log_text());
                }
                return p;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{service} not ready:\n{}", p.log_text());
    }

    pub fn collector_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.collector_port)
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn processor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.processor_port)
    }
}

fn http_status(url: &str) -> Option<u16> {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Sum of every sample of `metric` (any labels) in a Prometheus text page.
pub fn metric_sum(page: &str, metric: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sample of `metric{labels}` where every `label="value"` pair in `labels` matches.
pub fn metric_value(page: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines().filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' '])).find_map(|l| {
        let ok = labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")));
        if ok {
            l.rsplit(' ').next()?.parse().ok()
        } else {
            None
        }
    })
}

/// A column of a [`ClickHouse::json_rows`] row as text (numbers included).
pub fn col(row: &Value, name: &str) -> String {
    match &row[name] {
        Value::String(s) => s.clone(),
        Value::Null => panic!("no column {name} in {row}"),
        v => v.to_string(),
    }
}

/// An async HTTP client for tests.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

pub async fn get_text(url: &str) -> String {
    http().get(url).send().await.expect("GET").text().await.expect("body")
}

/// `GET` with a bearer token; returns (status, JSON body).
pub async fn get_json(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = http().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("GET");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Polls `cond` every 200 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Waits until every accepted fact has been processed: the collector spool is empty and the
/// processor counted as many facts as the collector accepted (`expected`).
pub async fn wait_processed(d: &Deployment, expected: u64, timeout: Duration) {
    let collector = format!("{}/metrics", d.collector_url());
    let processor = format!("{}/metrics", d.processor_url());
    eventually(timeout, "all accepted facts processed", || {
        let (c, p) = (collector.clone(), processor.clone());
        async move {
            let cm = get_text(&c).await;
            let pm = get_text(&p).await;
            let spooled = metric_sum(&cm, "eventflow_collector_spool_facts");
            let processed = metric_sum(&pm, "eventflow_processor_facts_total");
            spooled == 0.0 && processed >= expected as f64
        }
    })
    .await;
    // One more flush interval so the last flush is written.
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

/// Path of a helper file in `tests/`.
pub fn tests_path(p: &str) -> PathBuf {
    repo().join("tests").join(p)
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

// -------------------------------------------------------------------------------------------
// Current ClickHouse (chdb, embedded in Python) behind the HTTP interface of tests/chdb_http.py

pub struct Chdb {
    pub port: u16,
    proc: Proc,
}

impl Chdb {
    pub fn start(dir: &TestDir) -> Self {
        Self::start_named(dir, "chdb", None)
    }

    /// A chdb server whose ClickHouse configuration defines cluster `cluster` with one shard,
    /// this process (Distributed tables over it run locally; Replicated engines and
    /// `ON CLUSTER` need Keeper, which is not here).
    pub fn start_cluster(dir: &TestDir, cluster: &str) -> Self {
        let config = dir.join("chdb-cluster.xml");
        let tcp = free_port();
        fs::write(
            &config,
            format!(
                "<clickhouse><tcp_port>{tcp}</tcp_port><remote_servers><{cluster}><shard>\
                 <internal_replication>true</internal_replication><replica><host>localhost</host>\
                 <port>{tcp}</port></replica></shard></{cluster}></remote_servers>\
                 <macros><shard>01</shard><replica>r1</replica></macros></clickhouse>"
            ),
        )
        .expect("chdb cluster config");
        Self::start_named(dir, "chdb-cluster", Some(&config))
    }

    fn start_named(dir: &TestDir, name: &str, config: Option<&Path>) -> Self {
        let port = free_port();
        let data = dir.join(name);
        fs::create_dir_all(&data).expect("chdb dir");
        let mut cmd = Command::new("python3");
        cmd.arg(tests_path("chdb_http.py")).arg("--port").arg(port.to_string()).arg("--path").arg(&data);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let mut proc = Proc::spawn(name, cmd, dir.join(&format!("{name}.log")));
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if !proc.is_running() {
                panic!("the chdb server exited (is the chdb Python package installed?):\n{}", proc.log_text());
            }
            if http_status(&format!("http://127.0.0.1:{port}/ping")) == Some(200) {
                return Chdb { port, proc };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the chdb server did not start:\n{}", proc.log_text());
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The ClickHouse version chdb embeds.
    pub fn version(&self) -> String {
        let out = Command::new("curl")
            .args(["-s", &format!("{}/?query=SELECT%20version()", self.url())])
            .output()
            .expect("curl");
        let _ = &self.proc;
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

// -------------------------------------------------------------------------------------------
// Headless Chromium through chromedriver (Debian packages chromium and chromium-driver)

pub struct Browser {
    pub client: fantoccini::Client,
    _driver: Proc,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver's Chromium children outlive it when a test panics before close().
        let _ = Command::new("pkill").arg("-9").arg("-f").arg(self.profile.display().to_string()).status();
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a fresh profile in `dir`.
    pub async fn start(dir: &TestDir) -> Self {
        let port = free_port();
        let driver_bin = std::env::var("EVENTFLOW_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let mut cmd = Command::new(&driver_bin);
        cmd.arg(format!("--port={port}"));
        let driver = Proc::spawn("chromedriver", cmd, dir.join("chromedriver.log"));
        if !wait_tcp(port, Duration::from_secs(30)) {
            panic!("chromedriver did not start ({driver_bin})");
        }
        let profile = dir.join(&format!("chromium-profile-{port}"));
        fs::create_dir_all(&profile).expect("profile dir");
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": std::env::var("EVENTFLOW_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", "--disable-quic", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        });
        let caps = caps.as_object().cloned().expect("capabilities");
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = fantoccini::ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| panic!("starting headless chromium: {e}"));
        Browser { client, _driver: driver, profile }
    }

    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

/// A static-file server for test pages (tiny, in-process): serves `routes` by exact path; any
/// other path gets `fallback` (so `/event/...` and `/webinar/...` URLs work).
pub async fn serve_pages(routes: Vec<(String, String)>, fallback: String) -> (u16, tokio::task::JoinHandle<()>) {
    use axum::response::Html;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind pages");
    let port = listener.local_addr().expect("addr").port();
    let mut app = axum::Router::new();
    for (path, body) in routes {
        app = app.route(&path, axum::routing::get(move || async move { Html(body) }));
    }
    let app = app.fallback(move || async move { Html(fallback) });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, task)
}
