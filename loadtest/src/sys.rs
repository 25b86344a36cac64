//! Small operating-system and HTTP helpers: resident memory from `/proc/<pid>/status`, CPU time
//! from `/proc/<pid>/stat`, the open-files limit, and scraping a Prometheus `/metrics` endpoint
//! over plain TCP.

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

/// CPU time (user + system) process `pid` has used so far, in seconds (`/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    parse_cpu_ticks(&stat).map(|t| t as f64 / ticks.max(1) as f64)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line, in clock ticks. The command
/// name (field 2) may hold spaces and parentheses: fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After the name: field 3 (state) is the first; utime is field 14, the 12th here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The `RLIMIT_NOFILE` of this process: (soft, hard).
pub fn open_files_limits() -> (u64, u64) {
    // SAFETY: getrlimit only writes the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return (0, 0);
        }
        (limit.rlim_cur, limit.rlim_max)
    }
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
    fn cpu_ticks_are_counted_after_the_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 12345";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("42 (x) S 1"), None);
        assert!(cpu_seconds(std::process::id()).is_some());
        let (soft, hard) = open_files_limits();
        assert!(soft > 0 && soft <= hard);
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
