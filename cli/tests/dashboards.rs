//! Proof of `dashboards/`.
//!
//! - `static_checks`: `dashboards/test/check.sh` (promtool check config, check rules, and the
//!   alert unit tests in `alerts.test.yml`).
//! - `dashboards_against_a_live_stack`: starts the demo stack (4 `hoard node` processes, a private
//!   redis-server, the gateway on the PBFT cluster: `hoard_loadtest::stack`, what `hoard demo`
//!   runs) under simulated players, and a real Prometheus on a free loopback port scraping it
//!   every second with `dashboards/alerts.yml` loaded. Then, through Prometheus's HTTP API:
//!   every target is up; every rule is healthy; every PromQL expression of every dashboard panel
//!   (variables substituted) and the signal of every alert (its expression left of the
//!   threshold) returns at least one series with a finite value; every metric the gateway and the
//!   replicas export is used by a panel or an alert or listed in `dashboards/README.md` as
//!   deliberately not panelled; every metric an expression names is exported; and
//!   `promtool check metrics` accepts the gateway's and a replica's `/metrics`.
//!
//! Everything started is stopped on drop, also when an assertion fails.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hoard_loadtest::players::{PlayersConfig, Simulation};
use hoard_loadtest::stack::{Stack, StackOptions};
use hoard_loadtest::sys::http_get;

/// How long the players send (the checks run while they do).
const LOAD_DURATION: Duration = Duration::from_secs(60);
/// Load before the first round of checks (rate windows need a few scrapes).
const WARM_UP: Duration = Duration::from_secs(12);
/// How long the checks may retry before the test fails.
const CHECK_TIMEOUT: Duration = Duration::from_secs(40);
/// Prometheus's scrape and rule evaluation interval.
const SCRAPE_INTERVAL: &str = "1s";

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
fn dashboards_against_a_live_stack() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(live());
}

async fn live() {
    let started = Instant::now();
    let mut options = StackOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_hoard")));
    options.redis_aof = false;
    options.settle_interval_ms = 1_000;
    let stack = Stack::start(options).await.expect("start the stack");
    let gateway_metrics = stack.gateway_metrics();
    let replica_metrics: Vec<SocketAddr> = stack.replicas.iter().map(|r| r.metrics).collect();

    let mut players = PlayersConfig::new(stack.ws_url(), stack.tenant, stack.studio.clone());
    players.players = 200;
    players.direct_players = 20;
    players.players_per_game_server = 100;
    players.clicks_per_second = 5.0;
    players.asset_event_share = 0.05;
    players.trade_share = 0.3;
    players.duration = LOAD_DURATION;
    let simulation = Simulation::start(players)
        .await
        .expect("start the simulated players");

    let scratch = Scratch::new();
    let prometheus = Prometheus::start(&scratch.0, gateway_metrics, &replica_metrics);
    prometheus.wait_ready().await;
    tokio::time::sleep(WARM_UP).await;

    let expressions = dashboard_expressions();
    assert!(
        expressions.len() > 50,
        "only {} dashboard expressions",
        expressions.len()
    );

    let deadline = Instant::now() + CHECK_TIMEOUT;
    let mut round = 0;
    let alerts = loop {
        round += 1;
        let mut failures = Vec::new();
        failures.extend(prometheus.targets_down().await);
        let rules = prometheus.rules().await;
        for rule in &rules {
            if rule.health != "ok" {
                failures.push(format!("rule {} is {}: {}", rule.name, rule.health, rule.error));
            }
        }
        for (place, expr) in &expressions {
            if let Err(why) = prometheus.has_data(expr).await {
                failures.push(format!("{place}: {why}\n    {expr}"));
            }
        }
        for rule in &rules {
            if let Err(why) = prometheus.valid(&rule.query).await {
                failures.push(format!("alert {}: {why}\n    {}", rule.name, rule.query));
            }
            let signal = signal(&rule.query);
            if let Err(why) = prometheus.has_data(&signal).await {
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
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert!(alerts.len() >= 10, "only {} alert rules loaded", alerts.len());

    // Every exported metric is used or deliberately left out; every used metric exists.
    let gateway_text = http_get(gateway_metrics, "/metrics")
        .await
        .expect("gateway /metrics");
    let replica_text = http_get(replica_metrics[0], "/metrics")
        .await
        .expect("replica /metrics");
    let mut exported: BTreeSet<String> = hoard_server::metrics::METRICS
        .iter()
        .map(|m| m.0.to_string())
        .collect();
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
    let report = simulation.finish().await;
    assert!(report.events_accepted > 0, "the players made no asset events");
    stack.abort().await;
    eprintln!(
        "dashboards_against_a_live_stack: {round} rounds, {:?}",
        started.elapsed()
    );
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
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
    fn start(dir: &Path, gateway: SocketAddr, replicas: &[SocketAddr]) -> Prometheus {
        // The same job names as dashboards/prometheus.yml (dashboards and alerts select on them).
        let shipped =
            std::fs::read_to_string(dashboards_dir().join("prometheus.yml")).expect("prometheus.yml");
        for job in ["job_name: hoard-gateway", "job_name: hoard-replicas"] {
            assert!(shipped.contains(job), "dashboards/prometheus.yml lost `{job}`");
        }
        let targets = |addresses: &[SocketAddr]| {
            addresses
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: hoard-gateway\n    static_configs:\n      - targets: [{}]\n\
             \x20 - job_name: hoard-replicas\n    static_configs:\n      - targets: [{}]\n",
            dashboards_dir()
                .join("alerts.yml")
                .canonicalize()
                .expect("alerts.yml")
                .display(),
            targets(&[gateway]),
            targets(replicas),
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let program = std::env::var("PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let child = Command::new(&program)
            .arg(format!("--config.file={}", config_file.display()))
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

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(body) = http_get(self.address, "/-/ready").await {
                if body.contains("Ready") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus on {} did not become ready",
                self.address
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn api(&self, path: &str) -> serde_json::Value {
        let body = http_get(self.address, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    async fn query(&self, expr: &str) -> Result<serde_json::Value, String> {
        let answer = self
            .api(&format!("/api/v1/query?query={}", url_encode(expr)))
            .await;
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        Ok(answer["data"].clone())
    }

    async fn valid(&self, expr: &str) -> Result<(), String> {
        self.query(expr).await.map(|_| ())
    }

    /// At least one series, and at least one finite value.
    async fn has_data(&self, expr: &str) -> Result<(), String> {
        let data = self.query(expr).await?;
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

    async fn targets_down(&self) -> Vec<String> {
        let answer = self.api("/api/v1/targets?state=active").await;
        let targets = answer["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut down: Vec<String> = targets
            .iter()
            .filter(|t| t["health"] != "up")
            .map(|t| format!("target {} is {}: {}", t["scrapeUrl"], t["health"], t["lastError"]))
            .collect();
        if targets.len() != 5 {
            down.push(format!(
                "{} targets, expected the gateway and 4 replicas",
                targets.len()
            ));
        }
        down
    }

    async fn rules(&self) -> Vec<Rule> {
        let answer = self.api("/api/v1/rules").await;
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
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir().join("grafana"))
        .expect("dashboards/grafana")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "gateway, chain and economy dashboards: {files:?}");
    for file in files {
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
