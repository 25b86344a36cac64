//! Statistics of a load run: latency histograms (HDR, microsecond resolution), rates, and errors
//! counted by typed reason. Pure: no clock, no I/O; the caller passes durations in.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest latency a histogram records (larger values are clamped to it).
pub const LATENCY_MICROS_MAX: u64 = 600_000_000;
/// Significant decimal digits the histograms keep (0.1% relative error).
pub const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// A latency histogram in microseconds.
#[derive(Clone, Debug)]
pub struct Latency {
    histogram: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Latency {
        Latency::new()
    }
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn new() -> Latency {
        Latency {
            histogram: Histogram::new_with_bounds(1, LATENCY_MICROS_MAX, LATENCY_SIGNIFICANT_DIGITS)
                .expect("valid histogram bounds"),
        }
    }

    /// Records one latency (clamped to 1 us ..= [`LATENCY_MICROS_MAX`]).
    pub fn record(&mut self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, LATENCY_MICROS_MAX);
        self.histogram.record(micros).expect("clamped into bounds");
    }

    /// Records `count` samples of the same latency (one frame acknowledging many clicks).
    pub fn record_n(&mut self, latency: Duration, count: u64) {
        let micros = (latency.as_micros() as u64).clamp(1, LATENCY_MICROS_MAX);
        self.histogram
            .record_n(micros, count)
            .expect("clamped into bounds");
    }

    pub fn merge(&mut self, other: &Latency) {
        self.histogram.add(&other.histogram).expect("same bounds");
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    pub fn reset(&mut self) {
        self.histogram.reset();
    }

    /// The value at `quantile` (0.0 ..= 1.0), in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        if self.histogram.is_empty() {
            return 0.0;
        }
        self.histogram.value_at_quantile(quantile) as f64 / 1_000.0
    }

    pub fn summary(&self) -> LatencySummary {
        if self.histogram.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.histogram.len(),
            p50_ms: self.quantile_ms(0.50),
            p99_ms: self.quantile_ms(0.99),
            p999_ms: self.quantile_ms(0.999),
            max_ms: self.histogram.max() as f64 / 1_000.0,
            mean_ms: self.histogram.mean() / 1_000.0,
        }
    }
}

/// Events per second over `elapsed` (0 for an empty interval).
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        0.0
    } else {
        count as f64 / seconds
    }
}

/// The rate between two readings of a monotonic counter (0 if the counter went backwards, as
/// after a restart).
pub fn rate_between(before: u64, after: u64, elapsed: Duration) -> f64 {
    per_second(after.saturating_sub(before), elapsed)
}

/// The median of some figures (mean of the middle two for an even count); None when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let middle = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    })
}

/// Least-squares line through `points` (x, y): (slope, intercept). None with fewer than two
/// distinct x values.
pub fn linear_fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let slope = sxy / sxx;
    Some((slope, mean_y - slope * mean_x))
}

/// Growth of a resource per unit: `(after - before) / units` (negative if it shrank); None for
/// zero units.
pub fn growth_per_unit(before: u64, after: u64, units: u64) -> Option<f64> {
    (units > 0).then(|| (after as f64 - before as f64) / units as f64)
}

/// Limits a step of a players ladder must stay under to count as sustained.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct LadderLimits {
    /// p99 from a click's intended send time to its acknowledgement, ms.
    pub click_ack_p99_ms: f64,
    /// p99 from `accepted` to `committed`, ms.
    pub accept_to_commit_p99_ms: f64,
    /// Errors other than the ledger's own rejections (connection, timeout, busy, ...) allowed.
    pub errors_max: u64,
}

/// Why a ladder step was not sustained (None: sustained). `errors` are the step's errors by
/// reason; those starting with `rejected:` or containing `:rejected:` are the ledger's answers
/// to transfers the simulator could not know would fail, and do not count.
pub fn ladder_verdict(
    limits: &LadderLimits,
    click_ack_p99_ms: f64,
    accept_to_commit_p99_ms: f64,
    errors: &ErrorCounts,
) -> Option<String> {
    let counted: u64 = errors
        .0
        .iter()
        .filter(|(reason, _)| !(reason.starts_with("rejected:") || reason.contains(":rejected:")))
        .map(|(_, count)| count)
        .sum();
    if counted > limits.errors_max {
        return Some(format!(
            "{counted} errors (at most {} allowed)",
            limits.errors_max
        ));
    }
    if click_ack_p99_ms > limits.click_ack_p99_ms {
        return Some(format!(
            "click ack p99 {click_ack_p99_ms:.1} ms > {:.0} ms",
            limits.click_ack_p99_ms
        ));
    }
    if accept_to_commit_p99_ms > limits.accept_to_commit_p99_ms {
        return Some(format!(
            "accept-to-commit p99 {accept_to_commit_p99_ms:.1} ms > {:.0} ms",
            limits.accept_to_commit_p99_ms
        ));
    }
    None
}

/// Errors counted by their typed reason (`Rejected(InsufficientFunds)`, `Server(Busy)`, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts(pub BTreeMap<String, u64>);

impl ErrorCounts {
    pub fn add(&mut self, reason: impl Into<String>) {
        *self.0.entry(reason.into()).or_insert(0) += 1;
    }

    pub fn merge(&mut self, other: &ErrorCounts) {
        for (reason, count) in &other.0 {
            *self.0.entry(reason.clone()).or_insert(0) += count;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// Open-loop pacing: how many operations are due by `elapsed` at `rate_per_second`, and how far
/// behind schedule a sender is.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub rate_per_second: f64,
}

impl Schedule {
    /// Operations that should have been sent by `elapsed` since the start.
    pub fn due(&self, elapsed: Duration) -> u64 {
        (self.rate_per_second * elapsed.as_secs_f64()).floor() as u64
    }

    /// The intended send time (since the start) of operation number `index` (from 0): the
    /// moment it becomes due, so that `due(intended(i)) == i + 1`.
    pub fn intended(&self, index: u64) -> Duration {
        if self.rate_per_second <= 0.0 {
            return Duration::MAX;
        }
        Duration::from_secs_f64((index + 1) as f64 / self.rate_per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut latency = Latency::new();
        for ms in 1..=1_000u64 {
            latency.record(Duration::from_millis(ms));
        }
        let summary = latency.summary();
        assert_eq!(summary.count, 1_000);
        // 0.1% relative precision of the histogram.
        assert!((summary.p50_ms - 500.0).abs() <= 0.5, "{summary:?}");
        assert!((summary.p99_ms - 990.0).abs() <= 1.0, "{summary:?}");
        assert!((summary.p999_ms - 999.0).abs() <= 1.0, "{summary:?}");
        assert!((summary.max_ms - 1_000.0).abs() <= 1.0, "{summary:?}");
        assert!((summary.mean_ms - 500.5).abs() <= 0.5, "{summary:?}");
    }

    #[test]
    fn the_tail_is_not_hidden_by_many_fast_samples() {
        let mut latency = Latency::new();
        latency.record_n(Duration::from_micros(100), 9_980);
        latency.record_n(Duration::from_millis(250), 20);
        let summary = latency.summary();
        assert!(summary.p99_ms < 0.2, "{summary:?}");
        assert!((summary.p999_ms - 250.0).abs() < 0.5, "{summary:?}");
        assert!((summary.max_ms - 250.0).abs() < 0.5, "{summary:?}");
    }

    #[test]
    fn merging_adds_samples_and_out_of_range_values_are_clamped() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        a.record(Duration::from_millis(1));
        b.record(Duration::from_secs(10_000));
        b.record(Duration::ZERO);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert!(a.summary().max_ms >= 599_000.0);
        assert_eq!(Latency::new().summary(), LatencySummary::default());
    }

    #[test]
    fn rates() {
        assert_eq!(per_second(1_000, Duration::from_millis(500)), 2_000.0);
        assert_eq!(per_second(5, Duration::ZERO), 0.0);
        assert_eq!(rate_between(100, 400, Duration::from_secs(3)), 100.0);
        assert_eq!(rate_between(400, 100, Duration::from_secs(3)), 0.0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn schedule_is_by_the_clock() {
        let schedule = Schedule {
            rate_per_second: 1_000.0,
        };
        assert_eq!(schedule.due(Duration::from_millis(0)), 0);
        assert_eq!(schedule.due(Duration::from_millis(2_500)), 2_500);
        assert_eq!(schedule.intended(1_499), Duration::from_millis(1_500));
        for index in [0u64, 7, 999, 123_456] {
            assert_eq!(schedule.due(schedule.intended(index)), index + 1);
        }
        assert_eq!(Schedule { rate_per_second: 0.0 }.intended(1), Duration::MAX);
    }

    #[test]
    fn linear_fit_recovers_a_line_and_refuses_degenerate_input() {
        let points: Vec<(f64, f64)> = (1..=5)
            .map(|x| (x as f64 * 1_000.0, 3_000.0 + 4.5 * x as f64 * 1_000.0))
            .collect();
        let (slope, intercept) = linear_fit(&points).unwrap();
        assert!((slope - 4.5).abs() < 1e-9, "{slope}");
        assert!((intercept - 3_000.0).abs() < 1e-6, "{intercept}");
        // Noise symmetric around the line (+1 and -1 at the same x) does not tilt it.
        let noisy = [
            (0.0, 1.0),
            (1.0, 2.0),
            (2.0, 3.0),
            (3.0, 4.0),
            (1.0, 3.0),
            (1.0, 1.0),
        ];
        let (slope, _) = linear_fit(&noisy).unwrap();
        assert!((slope - 1.0).abs() < 1e-9, "{slope}");
        assert_eq!(linear_fit(&[(1.0, 2.0)]), None);
        assert_eq!(linear_fit(&[(1.0, 2.0), (1.0, 5.0)]), None);
    }

    #[test]
    fn growth_per_unit_is_signed() {
        assert_eq!(growth_per_unit(1_000, 81_000, 10), Some(8_000.0));
        assert_eq!(growth_per_unit(5_000, 4_000, 10), Some(-100.0));
        assert_eq!(growth_per_unit(1, 2, 0), None);
    }

    #[test]
    fn ladder_steps_fail_on_latency_or_errors_but_not_on_ledger_rejections() {
        let limits = LadderLimits {
            click_ack_p99_ms: 100.0,
            accept_to_commit_p99_ms: 200.0,
            errors_max: 0,
        };
        let mut errors = ErrorCounts::default();
        errors.add("rejected:InsufficientFunds");
        errors.add("trade:rejected:InsufficientFunds");
        assert_eq!(ladder_verdict(&limits, 99.0, 199.0, &errors), None);
        assert!(ladder_verdict(&limits, 101.0, 10.0, &errors)
            .unwrap()
            .contains("click ack"));
        assert!(ladder_verdict(&limits, 10.0, 201.0, &errors)
            .unwrap()
            .contains("accept-to-commit"));
        errors.add("clicks:Closed");
        assert!(ladder_verdict(&limits, 1.0, 1.0, &errors)
            .unwrap()
            .contains("1 errors"));
    }

    #[test]
    fn errors_by_reason() {
        let mut errors = ErrorCounts::default();
        errors.add("Rejected(NotOwner)");
        errors.add("Rejected(NotOwner)");
        let mut other = ErrorCounts::default();
        other.add("Server(Busy)");
        errors.merge(&other);
        assert_eq!(errors.total(), 3);
        assert_eq!(errors.0["Rejected(NotOwner)"], 2);
    }
}
