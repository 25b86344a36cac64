//! Proof of `dashboards/`.
//!
//! - `static_checks`: `dashboards/test/check.sh` (promtool check config, check rules, the alert
//!   unit tests in `alerts.test.yml`, and the configuration `prometheus-from-demo.sh` writes).
//! - `dashboards_against_a_live_stack`: runs `hoard demo --serve` (4 `hoard node` processes, a
//!   private redis-server, the gateway on the PBFT cluster, simulated players), writes a
//!   Prometheus configuration from what the demo printed with `dashboards/prometheus-from-demo.sh`
//!   (1 s scrape, `alerts.yml` loaded), and starts a real Prometheus on a free loopback port with
//!   temporary storage. Then, through Prometheus's HTTP API, while the players play: every target
//!   is up; every rule is healthy; every PromQL expression of every dashboard panel (variables
//!   substituted) and the signal of every alert (its expression left of the threshold) returns at
//!   least one series with a finite value. Finally: every metric the code exports is used by a
//!   panel or an alert or listed in `dashboards/README.md` as deliberately not panelled; every
//!   metric an expression names is exported; `promtool check metrics` accepts the gateway's and a
//!   replica's `/metrics`.
//!
//! Everything started is stopped on drop (the demo by SIGTERM, then SIGKILL; its replicas and
//! redis-server die with it), also when an assertion fails.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use hoard_ledger::testing::free_port;
use support::Background;

/// Seconds the demo's players play (longer than the checks need; the demo is stopped after them).
const DEMO_DURATION_SECONDS: u64 = 120;
/// How long the demo may take to print its endpoints.
const DEMO_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Load before the first round of checks (rate windows need a few scrapes).
const WARM_UP: Duration = Duration::from_secs(12);
/// How long the checks may retry before the test fails.
const CHECK_TIMEOUT: Duration = Duration::from_secs(40);
/// How long one HTTP request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Replicas the demo starts.
const REPLICAS: usize = 4;

/// Dashboard variables and the values the test queries with.
const SUBSTITUTIONS: &[(&str, &str)] = &[
    ("$__rate_interval", "10s"),
    ("$__interval", "2s"),
    ("$__range", "60s"),
    ("${instance}", ".*"),
    ("$instance", ".*"),
    ("${tenant}", "1"),
    ("$tenant", "1"),
];

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

#[test]
fn static_checks() {
    let output = Command::new(dashboards_dir().join("test/check.sh"))
        .output()
        .expect("run dashboards/test/check.sh (is promtool installed? scripts/test installs it)");
    assert!(
        output.status.success(),
        "dashboards/test/check.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn signal_strips_thresholds_and_guards() {
    assert_eq!(
        signal(r#"up{job="hoard-replicas"} == 0"#),
        r#"up{job="hoard-replicas"}"#
    );
    assert_eq!(
        signal("(changes(hoard_replica_height[1m]) == 0) and (hoard_replica_pending_requests > 0)"),
        "changes(hoard_replica_height[1m])"
    );
    assert_eq!(
        signal("sum by (a) (rate(x[5m])) > 10 * sum by (a) (rate(x[1h] offset 5m)) and sum by (a) (rate(x[5m])) > 1"),
        "sum by (a) (rate(x[5m]))"
    );
    assert_eq!(
        signal(r#"a{l=~"x>y"} - on (job) group_right b > 128"#),
        r#"a{l=~"x>y"} - on (job) group_right b"#
    );
    assert_eq!(signal("rate(x[5m])"), "rate(x[5m])");
}

#[test]
fn metric_names_skip_functions_labels_and_strings() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(hoard_a_bucket{job="hoard_b", x=~"up"}[5m]))) / up or on() vector(0)"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["hoard_a_bucket".to_string(), "up".to_string()])
    );
}

#[test]
fn dashboards_against_a_live_stack() {
    let started = Instant::now();
    let scratch = Scratch::new();
    let mut demo = Demo::start(&scratch.0);

    let config = scratch.0.join("prometheus.yml");
    let output = Command::new(dashboards_dir().join("prometheus-from-demo.sh"))
        .arg(&demo.log)
        .env("HOARD_SCRAPE_INTERVAL", "1s")
        .output()
        .expect("run dashboards/prometheus-from-demo.sh");
    assert!(
        output.status.success(),
        "prometheus-from-demo.sh: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::write(&config, &output.stdout).expect("write prometheus.yml");
    let prometheus = Prometheus::start(&scratch.0, &config);
    prometheus.wait_ready();
    std::thread::sleep(WARM_UP);

    let expressions = dashboard_expressions();
    assert!(
        expressions.len() > 50,
        "only {} dashboard expressions",
        expressions.len()
    );
    let variables = variable_queries();
    assert!(variables.len() >= 4, "only {} variable queries", variables.len());

    let deadline = Instant::now() + CHECK_TIMEOUT;
    let mut round = 0;
    let alerts = loop {
        round += 1;
        demo.assert_running();
        let mut failures = Vec::new();
        failures.extend(prometheus.targets_down());
        let rules = prometheus.rules();
        for rule in &rules {
            if rule.health != "ok" {
                failures.push(format!("rule {} is {}: {}", rule.name, rule.health, rule.error));
            }
        }
        for (place, selector, label, wanted) in &variables {
            let values = prometheus.label_values(selector, label);
            if values.is_empty() || !wanted.iter().all(|w| values.contains(w)) {
                failures.push(format!(
                    "{place}: label_values({selector}, {label}) = {values:?}, want {wanted:?}"
                ));
            }
        }
        for (place, expr) in &expressions {
            if let Err(why) = prometheus.has_data(expr) {
                failures.push(format!("{place}: {why}\n    {expr}"));
            }
        }
        for rule in &rules {
            if let Err(why) = prometheus.valid(&rule.query) {
                failures.push(format!("alert {}: {why}\n    {}", rule.name, rule.query));
            }
            let signal = signal(&rule.query);
            if let Err(why) = prometheus.has_data(&signal) {
                failures.push(format!("alert {} signal: {why}\n    {signal}", rule.name));
            }
        }
        if failures.is_empty() {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "after {round} rounds, {} problems:\n{}",
            failures.len(),
            failures.join("\n")
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(alerts.len() >= 10, "only {} alert rules loaded", alerts.len());

    // Every exported metric is used or deliberately left out; every used metric exists.
    let gateway_text = http_get(demo.gateway_metrics, "/metrics").expect("gateway /metrics");
    let replica_text = http_get(demo.replica_metrics[0], "/metrics").expect("replica /metrics");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut exported: BTreeSet<String> = hoard_server::metrics::METRICS
        .iter()
        .map(|m| m.0.to_string())
        .collect();
    exported.extend(metric_literals(&workspace.join("server/src"), "hoard_gateway_"));
    exported.extend(metric_literals(&workspace.join("ledger/src"), "hoard_replica_"));
    exported.extend(families(&gateway_text));
    exported.extend(families(&replica_text));
    let mut used = BTreeSet::new();
    for expr in expressions
        .iter()
        .map(|(_, e)| e)
        .chain(alerts.iter().map(|r| &r.query))
    {
        used.extend(metric_names(expr));
    }
    let unpanelled = readme_unpanelled();
    let mut problems = Vec::new();
    for name in &exported {
        let is_used = ["", "_bucket", "_sum", "_count"]
            .iter()
            .any(|s| used.contains(&format!("{name}{s}")));
        if !is_used && !unpanelled.contains(name) {
            problems.push(format!(
                "{name} is exported but neither panelled nor listed as unpanelled in README.md"
            ));
        }
        if is_used && unpanelled.contains(name) {
            problems.push(format!("{name} is panelled but README.md lists it as unpanelled"));
        }
    }
    for name in &unpanelled {
        if !exported.contains(name) {
            problems.push(format!(
                "README.md lists {name} as unpanelled, but nothing exports it"
            ));
        }
    }
    for name in &used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| exported.contains(*f)))
            .unwrap_or(name);
        if !exported.contains(family) && name != "up" {
            problems.push(format!("an expression uses {name}, which nothing exports"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // promtool check metrics on both expositions.
    let gateway_file = scratch.0.join("gateway.metrics");
    let replica_file = scratch.0.join("replica.metrics");
    std::fs::write(&gateway_file, &gateway_text).expect("write");
    std::fs::write(&replica_file, &replica_text).expect("write");
    let output = Command::new(dashboards_dir().join("test/check-metrics.sh"))
        .arg(&gateway_file)
        .arg(&replica_file)
        .output()
        .expect("run dashboards/test/check-metrics.sh");
    assert!(
        output.status.success(),
        "promtool check metrics:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    drop(prometheus);
    drop(demo);
    eprintln!(
        "dashboards_against_a_live_stack: {} panel queries, {} alerts, {} metrics, {round} rounds, {:?}",
        expressions.len(),
        alerts.len(),
        exported.len(),
        started.elapsed()
    );
}

/// `hoard demo --serve`, stopped on drop (SIGTERM: the demo stops its players, replicas and
/// redis-server; then SIGKILL).
struct Demo {
    process: Background,
    /// What it printed up to its endpoints (the input of prometheus-from-demo.sh).
    log: PathBuf,
    gateway_metrics: SocketAddr,
    replica_metrics: Vec<SocketAddr>,
}

impl Demo {
    fn start(dir: &Path) -> Demo {
        let duration = DEMO_DURATION_SECONDS.to_string();
        // The data directory inside the scratch directory, so that it goes even if the demo is
        // killed.
        let data = dir.join("demo");
        let args: Vec<&std::ffi::OsStr> = [
            "demo",
            "--serve",
            "--players",
            "200",
            "--clicks-per-second",
            "5",
            "--asset-event-share",
            "0.05",
            "--duration",
            &duration,
            "--data-dir",
        ]
        .into_iter()
        .map(std::ffi::OsStr::new)
        .chain([data.as_os_str()])
        .collect();
        let mut process = Background::start(&args, "TERM");
        let mut gateway_metrics = None;
        let mut replica_metrics = Vec::new();
        let printed = process.read_until(DEMO_START_TIMEOUT, |line| {
            let address = || {
                let rest = line.split("http://").nth(1)?;
                rest.split('/').next()?.parse::<SocketAddr>().ok()
            };
            if line.contains("gateway metrics:") {
                gateway_metrics = Some(address().expect("gateway metrics address"));
            } else if line.contains("replica") && line.contains("metrics:") {
                replica_metrics.push(address().expect("replica metrics address"));
            }
            gateway_metrics.is_some() && replica_metrics.len() >= REPLICAS
        });
        let log = dir.join("demo.log");
        std::fs::write(&log, &printed).expect("write demo.log");
        Demo {
            process,
            log,
            gateway_metrics: gateway_metrics.expect("read until printed"),
            replica_metrics,
        }
    }

    fn assert_running(&mut self) {
        self.process.assert_running();
    }
}

/// A minimal HTTP/1.0 GET; returns the body of a 200 answer.
fn http_get(address: SocketAddr, path: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&address, HTTP_TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(HTTP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("{}: {body}", head.lines().next().unwrap_or_default()));
    }
    Ok(body.to_string())
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let path = std::env::temp_dir().join(format!(
            "hoard-dashboards-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&path).expect("scratch dir");
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A Prometheus process, killed on drop.
struct Prometheus {
    child: Child,
    address: SocketAddr,
}

struct Rule {
    name: String,
    query: String,
    health: String,
    error: String,
}

impl Prometheus {
    fn start(dir: &Path, config: &Path) -> Prometheus {
        let text = std::fs::read_to_string(config).expect("read the generated prometheus.yml");
        // The same job names as dashboards/prometheus.yml (dashboards and alerts select on them).
        let shipped =
            std::fs::read_to_string(dashboards_dir().join("prometheus.yml")).expect("prometheus.yml");
        for job in ["job_name: hoard-gateway", "job_name: hoard-replicas"] {
            assert!(shipped.contains(job), "dashboards/prometheus.yml lost `{job}`");
            assert!(text.contains(job), "prometheus-from-demo.sh lost `{job}`");
        }
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let program = std::env::var("PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let child = Command::new(&program)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={address}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program} (scripts/test installs it): {e}"));
        Prometheus { child, address }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(self.address, "/-/ready").is_err() {
            assert!(
                Instant::now() < deadline,
                "prometheus on {} did not become ready",
                self.address
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn api(&self, path: &str) -> serde_json::Value {
        // Prometheus answers errors (a bad query) with 400 and a JSON body too.
        let body = match http_get(self.address, path) {
            Ok(body) => body,
            Err(error) => error
                .split_once(": ")
                .map(|(_, b)| b.to_string())
                .unwrap_or(error),
        };
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    fn query(&self, expr: &str) -> Result<serde_json::Value, String> {
        let answer = self.api(&format!("/api/v1/query?query={}", url_encode(expr)));
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        Ok(answer["data"].clone())
    }

    fn valid(&self, expr: &str) -> Result<(), String> {
        self.query(expr).map(|_| ())
    }

    /// At least one series, and at least one finite value.
    fn has_data(&self, expr: &str) -> Result<(), String> {
        let data = self.query(expr)?;
        let result = data["result"].as_array().cloned().unwrap_or_default();
        if result.is_empty() {
            return Err("no series".into());
        }
        let finite = result.iter().any(|series| {
            series["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(f64::is_finite)
        });
        if !finite {
            return Err(format!("{} series, none with a finite value", result.len()));
        }
        Ok(())
    }

    /// What Grafana's `label_values(selector, label)` shows.
    fn label_values(&self, selector: &str, label: &str) -> Vec<String> {
        let answer = self.api(&format!(
            "/api/v1/label/{label}/values?match[]={}",
            url_encode(selector)
        ));
        let values = answer["data"].as_array().cloned().unwrap_or_default();
        values
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    }

    fn targets_down(&self) -> Vec<String> {
        let answer = self.api("/api/v1/targets?state=active");
        let targets = answer["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut down: Vec<String> = targets
            .iter()
            .filter(|t| t["health"] != "up")
            .map(|t| format!("target {} is {}: {}", t["scrapeUrl"], t["health"], t["lastError"]))
            .collect();
        if targets.len() != REPLICAS + 1 {
            down.push(format!(
                "{} targets, expected the gateway and {REPLICAS} replicas",
                targets.len()
            ));
        }
        down
    }

    fn rules(&self) -> Vec<Rule> {
        let answer = self.api("/api/v1/rules");
        let mut rules = Vec::new();
        for group in answer["data"]["groups"].as_array().cloned().unwrap_or_default() {
            for rule in group["rules"].as_array().cloned().unwrap_or_default() {
                let text = |key: &str| rule[key].as_str().unwrap_or_default().to_string();
                rules.push(Rule {
                    name: text("name"),
                    query: text("query"),
                    health: text("health"),
                    error: text("lastError"),
                });
            }
        }
        rules
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// ("dashboard / panel / refId", expr with variables substituted) of every panel target.
fn dashboard_expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for file in dashboard_files() {
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("dashboard JSON");
        let title = dashboard["title"].as_str().expect("title").to_string();
        let variables: BTreeSet<&str> = dashboard["templating"]["list"]
            .as_array()
            .expect("templating")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert!(
            variables.contains("datasource") && variables.contains("instance"),
            "{title}: {variables:?}"
        );
        let mut panels: Vec<serde_json::Value> = dashboard["panels"].as_array().expect("panels").clone();
        while let Some(panel) = panels.pop() {
            if let Some(nested) = panel["panels"].as_array() {
                panels.extend(nested.iter().cloned());
            }
            if panel["type"] == "row" {
                continue;
            }
            let name = panel["title"].as_str().unwrap_or("?");
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title} / {name}");
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            assert!(!targets.is_empty(), "{title} / {name} has no query");
            for target in targets {
                let mut expr = target["expr"].as_str().expect("expr").to_string();
                for (variable, value) in SUBSTITUTIONS {
                    expr = expr.replace(variable, value);
                }
                assert!(
                    !expr.contains('$'),
                    "{title} / {name}: unknown variable in {expr}"
                );
                out.push((
                    format!("{title} / {name} / {}", target["refId"].as_str().unwrap_or("?")),
                    expr,
                ));
            }
        }
    }
    out
}

/// ("dashboard / variable", selector, label, values that must be offered) of every query
/// variable (`label_values(selector, label)`): the demo's tenant 1 must be offered.
fn variable_queries() -> Vec<(String, String, String, Vec<String>)> {
    let mut out = Vec::new();
    for file in dashboard_files() {
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("dashboard JSON");
        let title = dashboard["title"].as_str().expect("title");
        for variable in dashboard["templating"]["list"].as_array().expect("templating") {
            if variable["type"] != "query" {
                continue;
            }
            let name = variable["name"].as_str().expect("name");
            let query = variable["query"]["query"]
                .as_str()
                .or(variable["query"].as_str())
                .expect("query");
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{title} / {name}: not label_values(...): {query}"));
            let (selector, label) = inner.rsplit_once(',').expect("label_values(selector, label)");
            let wanted = if name == "tenant" {
                vec!["1".to_string()]
            } else {
                vec![]
            };
            out.push((
                format!("{title} / ${name}"),
                selector.trim().to_string(),
                label.trim().to_string(),
                wanted,
            ));
        }
    }
    out
}

fn dashboard_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir().join("grafana"))
        .expect("dashboards/grafana")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "gateway, chain and economy dashboards: {files:?}");
    files
}

/// The depth-0 byte positions of `expr` (outside (), [], {} and string literals).
fn top_level(expr: &str) -> Vec<bool> {
    let bytes = expr.as_bytes();
    let mut depth = 0i32;
    let mut quote: Option<u8> = None;
    let mut out = vec![false; bytes.len()];
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) => {
                if b == b'\\' {
                    i += 1;
                } else if b == q {
                    quote = None;
                }
            }
            None => match b {
                b'"' | b'\'' | b'`' => quote = Some(b),
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                _ => out[i] = depth == 0,
            },
        }
        i += 1;
    }
    out
}

fn strip_parens(expr: &str) -> &str {
    let mut expr = expr.trim();
    while expr.starts_with('(') && expr.ends_with(')') {
        let inner = &expr[1..expr.len() - 1];
        // The outer parentheses wrap everything iff the inner text is balanced on its own.
        let mut depth = 0i32;
        let balanced = inner.bytes().all(|b| {
            match b {
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ => {}
            }
            depth >= 0
        }) && depth == 0;
        if !balanced {
            break;
        }
        expr = inner.trim();
    }
    expr
}

/// An alert's signal: its expression without `and`/`unless` guards and without the threshold
/// comparison (alerts.yml writes every alert as `<signal> <comparison> <threshold>`).
fn signal(expr: &str) -> String {
    let expr = strip_parens(expr);
    let top = top_level(expr);
    let at_top = |i: usize, len: usize| (i..i + len).all(|j| top[j]);
    for keyword in [" and ", " unless "] {
        if let Some(i) = expr
            .match_indices(keyword)
            .map(|(i, _)| i)
            .find(|&i| at_top(i, keyword.len()))
        {
            return signal(&expr[..i]);
        }
    }
    let bytes = expr.as_bytes();
    for i in (0..bytes.len()).rev() {
        if !top[i] {
            continue;
        }
        let two = bytes.get(i..i + 2).unwrap_or_default();
        let is_comparison = matches!(two, b"==" | b"!=" | b">=" | b"<=")
            || (matches!(bytes[i], b'>' | b'<') && bytes.get(i + 1) != Some(&b'='));
        let part_of_two = i > 0 && matches!(&bytes[i - 1..i + 1], b"==" | b"!=" | b">=" | b"<=");
        if is_comparison && !part_of_two {
            return strip_parens(&expr[..i]).to_string();
        }
    }
    expr.to_string()
}

/// Metric names an expression selects (identifiers followed by `{`, `[`, or standing alone,
/// that are not functions, keywords or label names).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    let mut in_braces = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if b == b'\\' {
                i += 1;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => in_braces += 1,
            b'}' => in_braces -= 1,
            _ => {}
        }
        if (b.is_ascii_alphabetic() || b == b'_') && (i == 0 || !is_ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && is_ident(bytes[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let next = expr[i..].trim_start().bytes().next();
            if in_braces == 0
                && next != Some(b'(')
                && (word.starts_with("hoard_") || word.starts_with("process_") || word == "up")
            {
                names.insert(word.to_string());
            }
            continue;
        }
        i += 1;
    }
    names
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// The `"<prefix>..."` string literals in the Rust sources under `dir` (the metric names the
/// code records, also those not yet recorded in this run, e.g. dropped frames).
fn metric_literals(dir: &Path, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read source dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).expect("read source");
            let quoted = format!("\"{prefix}");
            for (at, _) in source.match_indices(&quoted) {
                let rest = &source[at + 1..];
                let end = rest
                    .find(|c: char| !is_ident(c as u8) || !c.is_ascii())
                    .unwrap_or(rest.len());
                if rest[end..].starts_with('"') && end > prefix.len() {
                    names.insert(rest[..end].to_string());
                }
            }
        }
    }
    names
}

/// Metric families in Prometheus exposition text (from `# TYPE` lines).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The metrics `dashboards/README.md` lists under "Deliberately not panelled" (`- \`name\`` lines).
fn readme_unpanelled() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(dashboards_dir().join("README.md")).expect("dashboards/README.md");
    let section = readme
        .split("## Deliberately not panelled")
        .nth(1)
        .expect("README.md has a `## Deliberately not panelled` section");
    let section = section.split("\n## ").next().unwrap_or_default();
    section
        .lines()
        .filter_map(|line| line.strip_prefix("- `"))
        .filter_map(|rest| rest.split('`').next())
        .map(str::to_string)
        .collect()
}
