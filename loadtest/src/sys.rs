//! Small operating-system and HTTP helpers: resident memory from `/proc/<pid>/status`, raising
//! the open-files limit, and scraping a Prometheus `/metrics` endpoint over plain TCP.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest `/metrics` answer read.
pub const METRICS_RESPONSE_BYTES_MAX: usize = 16 << 20;
/// Time allowed for one scrape.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// Resident set size of process `pid` in bytes (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (at least `want` if allowed); returns the
/// new soft limit.
pub fn raise_open_files_limit(want: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        let target = want.min(limit.rlim_max).max(limit.rlim_cur);
        limit.rlim_cur = target;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            let mut now = limit;
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut now);
            return now.rlim_cur;
        }
        target
    }
}

/// One sample of a Prometheus text exposition: `name{labels}` and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: String,
    pub value: f64,
}

/// Parses the Prometheus text format (comments skipped).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rfind(' ') {
            Some(at) => (&line[..at], &line[at + 1..]),
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match series.find('{') {
            Some(at) => (&series[..at], series[at..].to_string()),
            None => (series, String::new()),
        };
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    samples
}

/// The sum of every series of `name` (all label values).
pub fn sum(samples: &[Sample], name: &str) -> f64 {
    samples.iter().filter(|s| s.name == name).map(|s| s.value).sum()
}

/// The largest value of any series of `name`.
pub fn max(samples: &[Sample], name: &str) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .reduce(f64::max)
}

/// GETs `http://address/metrics` and parses it.
pub async fn scrape(address: SocketAddr) -> anyhow::Result<Vec<Sample>> {
    let text = tokio::time::timeout(SCRAPE_TIMEOUT, http_get(address, "/metrics")).await??;
    Ok(parse_metrics(&text))
}

/// A minimal HTTP/1.0 GET; returns the body.
pub async fn http_get(address: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(address).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..read]);
        anyhow::ensure!(
            response.len() <= METRICS_RESPONSE_BYTES_MAX,
            "answer from {address} too large"
        );
    }
    let text = String::from_utf8_lossy(&response);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t    2048 kB\nThreads: 3\n";
        assert_eq!(parse_vm_rss(status), Some(2 * 1024 * 1024));
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn prometheus_text_parses() {
        let text = "# HELP a b\n# TYPE x counter\nx_total 5\nh{replica=\"0\"} 12\nh{replica=\"1\"} 14\n\
                    s{quantile=\"0.5\"} 0.25\nbad line\n";
        let samples = parse_metrics(text);
        assert_eq!(samples.len(), 4);
        assert_eq!(sum(&samples, "x_total"), 5.0);
        assert_eq!(sum(&samples, "h"), 26.0);
        assert_eq!(max(&samples, "h"), Some(14.0));
        assert_eq!(max(&samples, "missing"), None);
    }
}
