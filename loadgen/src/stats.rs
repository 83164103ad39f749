//! Results: per-thread counters and an HdrHistogram of latency in
//! microseconds, merged at the end; the open-loop schedule that corrects for
//! coordinated omission; and the outputs (summary, .hgrm, JSON, SVG). Pure.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

/// The longest latency recorded exactly (an hour); longer ones saturate.
const MAX_US: u64 = 3_600_000_000;
/// A send more than this behind its intended time counts as late.
pub const LATE_US: u64 = 1_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// What one thread (or the whole run) saw.
#[derive(Debug, Clone)]
pub struct Stats {
    pub latency: Histogram<u64>,
    pub status: BTreeMap<u16, u64>,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub timeouts: u64,
    /// Open loop: requests sent more than [`LATE_US`] after their intended time.
    pub late: u64,
    pub body_bytes: u64,
    /// When the last response came, in ns since the run's start: the
    /// run's duration for the rate of a `--requests` run.
    pub last_response_ns: u64,
    /// Responses that came after `--duration` ended: in the histogram and
    /// the request count, not in the rate.
    pub after_end: u64,
    /// Open loop: requests due before the end that were never sent (their
    /// connection was stalled); not in the histogram.
    pub unsent: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            latency: new_histogram(),
            status: BTreeMap::new(),
            connect_errors: 0,
            read_errors: 0,
            timeouts: 0,
            late: 0,
            body_bytes: 0,
            last_response_ns: 0,
            after_end: 0,
            unsent: 0,
        }
    }
}

impl Stats {
    pub fn record(&mut self, status: u16, latency_us: u64, body_bytes: u64) {
        self.latency.saturating_record(latency_us.max(1));
        *self.status.entry(status).or_default() += 1;
        self.body_bytes += body_bytes;
    }

    pub fn merge(&mut self, other: &Stats) {
        // Both histograms share bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        for (k, v) in &other.status {
            *self.status.entry(*k).or_default() += v;
        }
        self.connect_errors += other.connect_errors;
        self.read_errors += other.read_errors;
        self.timeouts += other.timeouts;
        self.late += other.late;
        self.body_bytes += other.body_bytes;
        self.last_response_ns = self.last_response_ns.max(other.last_response_ns);
        self.after_end += other.after_end;
        self.unsent += other.unsent;
    }

    pub fn requests(&self) -> u64 {
        self.latency.len()
    }

    pub fn errors(&self) -> u64 {
        self.connect_errors + self.read_errors + self.timeouts
    }

    pub fn non_2xx_3xx(&self) -> u64 {
        self.status
            .iter()
            .filter(|(k, _)| !(200..400).contains(*k))
            .map(|(_, v)| v)
            .sum()
    }
}

/// The open-loop schedule of one connection: request k is meant to go out at
/// `start + offset + k × interval`, whatever happened to earlier requests.
/// Latency counts from that intended time, so a server that stalls is
/// charged for every request that should have been sent during the stall
/// (coordinated omission corrected, as wrk2 does).
#[derive(Debug, Clone)]
pub struct Schedule {
    interval_ns: u64,
    next_ns: u64,
}

impl Schedule {
    /// `rate_per_s` for this connection; `offset_ns` staggers connections.
    pub fn new(rate_per_s: f64, offset_ns: u64) -> Schedule {
        // Any positive rate, however small (an interval of years saturates).
        let interval_ns = (1e9 / rate_per_s.max(1e-9)).max(1.0) as u64;
        Schedule {
            interval_ns,
            next_ns: offset_ns % interval_ns.max(1),
        }
    }

    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// The intended time of the next request, in ns since the run started.
    pub fn peek(&self) -> u64 {
        self.next_ns
    }

    /// Takes the next slot; returns `(intended_ns, late)` given `now_ns`.
    pub fn take(&mut self, now_ns: u64) -> (u64, bool) {
        let t = self.next_ns;
        self.next_ns += self.interval_ns;
        (t, now_ns.saturating_sub(t) > LATE_US * 1000)
    }
}

/// Latency in µs from the intended send time to completion.
pub fn corrected_latency_us(intended_ns: u64, done_ns: u64) -> u64 {
    done_ns.saturating_sub(intended_ns) / 1000
}

/// One herd round: every connection asked for the same fresh key.
#[derive(Debug, Clone, Default)]
pub struct Round {
    pub latencies_us: Vec<u64>,
    /// Connections whose request in this round failed.
    pub failed: u64,
}

impl Round {
    pub fn max_us(&self) -> u64 {
        self.latencies_us.iter().copied().max().unwrap_or(0)
    }
    pub fn p50_us(&self) -> u64 {
        quantile(&self.latencies_us, 0.5)
    }
    pub fn p99_us(&self) -> u64 {
        quantile(&self.latencies_us, 0.99)
    }
}

fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let idx = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[idx]
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct Report {
    pub stats: Stats,
    pub duration: Duration,
    pub rounds: Vec<Round>,
    pub url: String,
    pub connections: usize,
    pub threads: usize,
    pub mode: String,
}

/// Percentiles printed in the summary.
pub const PERCENTILES: [f64; 6] = [50.0, 75.0, 90.0, 99.0, 99.9, 99.99];

/// `s` as the inside of a JSON string.
fn json_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o
}

/// The value at percentile `p` (0..=100), as HdrHistogram's own
/// `getValueAtPercentile`: `p / 100 * count` is nudged down before it is
/// rounded up to a rank, so that floating point error does not move it one
/// rank up (99.9 / 100 is 0.9990000000000001: p99.9 of 1000 values was the
/// largest, not the 999th).
pub fn at_percentile(h: &Histogram<u64>, p: f64) -> u64 {
    h.value_at_quantile((p / 100.0 - 1e-12).clamp(0.0, 1.0))
}

fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2}s", us / 1e6)
    } else if us >= 1000.0 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{us:.0}us")
    }
}

impl Report {
    /// Responses within the run's time over that time (for `--duration`,
    /// those that came after its end are left out).
    pub fn rps(&self) -> f64 {
        let n = self.stats.requests().saturating_sub(self.stats.after_end);
        n as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    /// The wrk-like text summary.
    pub fn summary(&self) -> String {
        let s = &self.stats;
        let h = &s.latency;
        let mut o = String::new();
        let _ = writeln!(o, "{} @ {}", self.mode, self.url);
        let _ = writeln!(
            o,
            "  {} threads and {} connections",
            self.threads, self.connections
        );
        let _ = writeln!(
            o,
            "  Latency   mean {}  stdev {}  max {}",
            fmt_us(h.mean()),
            fmt_us(h.stdev()),
            fmt_us(h.max() as f64)
        );
        let _ = writeln!(o, "  Latency distribution");
        for p in PERCENTILES {
            let _ = writeln!(o, "  {:>7}%  {}", p, fmt_us(at_percentile(h, p) as f64));
        }
        let _ = writeln!(o, "      max  {}", fmt_us(h.max() as f64));
        let _ = writeln!(
            o,
            "  {} requests in {:.2}s, {:.1} MB body read",
            s.requests(),
            self.duration.as_secs_f64(),
            s.body_bytes as f64 / 1e6
        );
        let codes: Vec<String> = s.status.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let _ = writeln!(o, "  Status codes: {}", codes.join(", "));
        if s.errors() > 0 {
            let _ = writeln!(
                o,
                "  Socket errors: connect {}, read {}, timeout {}",
                s.connect_errors, s.read_errors, s.timeouts
            );
        }
        if s.late > 0 {
            let _ = writeln!(
                o,
                "  Late sends (open loop, >1ms behind schedule): {}",
                s.late
            );
        }
        if !self.rounds.is_empty() {
            let maxes: Vec<u64> = self.rounds.iter().map(Round::max_us).collect();
            let _ = writeln!(
                o,
                "  Herd: {} rounds; slowest response per round: min {} median {} max {}",
                self.rounds.len(),
                fmt_us(*maxes.iter().min().unwrap_or(&0) as f64),
                fmt_us(quantile(&maxes, 0.5) as f64),
                fmt_us(*maxes.iter().max().unwrap_or(&0) as f64)
            );
            // Per-round figures are over the answered requests: say how many
            // were not.
            let failed: u64 = self.rounds.iter().map(|r| r.failed).sum();
            if failed > 0 {
                let in_rounds = self.rounds.iter().filter(|r| r.failed > 0).count();
                let _ = writeln!(
                    o,
                    "  Herd: {failed} requests failed, in {in_rounds} rounds (not in the round figures)"
                );
            }
        }
        if s.unsent > 0 {
            let _ = writeln!(
                o,
                "  Unsent (open loop, due before the end, never sent): {}",
                s.unsent
            );
        }
        if s.after_end > 0 {
            let _ = writeln!(
                o,
                "  Responses after the end: {} (counted, not in Requests/sec)",
                s.after_end
            );
        }
        let _ = writeln!(o, "Requests/sec: {:.2}", self.rps());
        o
    }

    /// The machine-readable summary (INTERFACE.md).
    pub fn json(&self) -> String {
        let s = &self.stats;
        let h = &s.latency;
        let mut o = String::from("{");
        let _ = write!(
            o,
            "\"url\": \"{}\", \"mode\": \"{}\", \"connections\": {}, \"threads\": {}, ",
            json_escape(&self.url),
            self.mode,
            self.connections,
            self.threads
        );
        let _ = write!(
            o,
            "\"requests\": {}, \"duration_s\": {:.6}, \"rps\": {:.3}, \"errors\": {}, ",
            s.requests(),
            self.duration.as_secs_f64(),
            self.rps(),
            s.errors()
        );
        let _ = write!(
            o,
            "\"connect_errors\": {}, \"read_errors\": {}, \"timeouts\": {}, \"late\": {}, \"after_end\": {}, \"unsent\": {}, \"body_bytes\": {}, ",
            s.connect_errors, s.read_errors, s.timeouts, s.late, s.after_end, s.unsent, s.body_bytes
        );
        let codes: Vec<String> = s
            .status
            .iter()
            .map(|(k, v)| format!("\"{k}\": {v}"))
            .collect();
        let _ = write!(o, "\"status\": {{{}}}, ", codes.join(", "));
        let _ = write!(
            o,
            "\"latency_us\": {{\"p50\": {}, \"p75\": {}, \"p90\": {}, \"p99\": {}, \"p999\": {}, \"p9999\": {}, \"max\": {}, \"mean\": {:.3}}}",
            at_percentile(h, 50.0),
            at_percentile(h, 75.0),
            at_percentile(h, 90.0),
            at_percentile(h, 99.0),
            at_percentile(h, 99.9),
            at_percentile(h, 99.99),
            h.max(),
            h.mean()
        );
        if !self.rounds.is_empty() {
            let list = |f: fn(&Round) -> u64| -> String {
                self.rounds
                    .iter()
                    .map(|r| f(r).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = write!(
                o,
                ", \"herd\": {{\"rounds\": {}, \"round_p50_us\": [{}], \"round_p99_us\": [{}], \"round_max_us\": [{}], \"round_failed\": [{}]}}",
                self.rounds.len(),
                list(Round::p50_us),
                list(Round::p99_us),
                list(Round::max_us),
                list(|r| r.failed)
            );
        }
        o.push('}');
        o
    }
}

/// HdrHistogram's percentile distribution text (values in milliseconds,
/// five ticks per half distance), as its Java `outputPercentileDistribution`
/// writes and its plotter reads.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if h.is_empty() {
        return o;
    }
    let total = h.len();
    let mut cumulative: u64 = 0;
    for v in h.iter_quantiles(5) {
        cumulative += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let value_ms = h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0;
        if q < 1.0 {
            let _ = writeln!(
                o,
                "{:>12.3} {:>2.12} {:>10} {:>14.2}",
                value_ms,
                q,
                cumulative,
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(o, "{:>12.3} {:>2.12} {:>10}", value_ms, q, total);
        }
    }
    let _ = writeln!(
        o,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        o,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / 1000.0,
        total
    );
    let _ = writeln!(
        o,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        sub_buckets(h.sigfig())
    );
    o
}

/// A latency-by-percentile plot on a logarithmic "nines" axis, like
/// HdrHistogram's plotter: x = 1/(1-percentile) from 1 to 10^6.
pub fn svg(h: &Histogram<u64>, title: &str) -> String {
    let (w, hgt, left, bottom, top, right) = (800.0, 480.0, 70.0, 50.0, 40.0, 20.0);
    let pw = w - left - right;
    let ph = hgt - top - bottom;
    let max_nines = 6.0;
    let points: Vec<(f64, f64)> = if h.is_empty() {
        Vec::new()
    } else {
        (0..=600)
            .map(|i| {
                let nines = i as f64 / 100.0;
                let q = 1.0 - 10f64.powf(-nines);
                let p = (q * 100.0).min(100.0);
                (nines, at_percentile(h, p) as f64 / 1000.0)
            })
            .collect()
    };
    let ymax = points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(0.001) * 1.1;
    let x = |n: f64| left + n / max_nines * pw;
    let y = |v: f64| top + ph - v / ymax * ph;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{hgt}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(o, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        o,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>",
        w / 2.0,
        title.replace('&', "&amp;").replace('<', "&lt;")
    );
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"]
        .iter()
        .enumerate()
    {
        let xi = x(i as f64);
        let _ = writeln!(
            o,
            "<line x1=\"{xi}\" y1=\"{top}\" x2=\"{xi}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{xi}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            top + ph,
            top + ph + 18.0
        );
    }
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let yi = y(v);
        let _ = writeln!(
            o,
            "<line x1=\"{left}\" y1=\"{yi}\" x2=\"{}\" y2=\"{yi}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.2}</text>",
            left + pw,
            left - 6.0,
            yi + 4.0
        );
    }
    let _ = writeln!(
        o,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">percentile</text><text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">latency (ms)</text>",
        left + pw / 2.0,
        hgt - 8.0,
        top + ph / 2.0,
        top + ph / 2.0
    );
    let path: Vec<String> = points
        .iter()
        .map(|&(n, v)| format!("{:.1},{:.1}", x(n), y(v)))
        .collect();
    let _ = writeln!(
        o,
        "<polyline fill=\"none\" stroke=\"#c0392b\" stroke-width=\"2\" points=\"{}\"/>",
        path.join(" ")
    );
    o.push_str("</svg>\n");
    o
}

/// HdrHistogram's sub-bucket count for `sigfig` significant digits (what
/// Java's `outputPercentileDistribution` prints: 2048 for 3 digits).
fn sub_buckets(sigfig: u8) -> u32 {
    let largest = 2.0 * 10f64.powi(i32::from(sigfig));
    1 << (largest.log2().ceil() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_ranks_without_floating_point_drift() {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        // 99.9 / 100 * 1000 is 999.0000000000001: rounded up, that was
        // rank 1000 (the max) instead of 999.
        assert_eq!(h.value_at_percentile(99.9), 1000);
        assert_eq!(at_percentile(&h, 99.9), 999);
        assert_eq!(at_percentile(&h, 50.0), 500);
        assert_eq!(at_percentile(&h, 75.0), 750);
        assert_eq!(at_percentile(&h, 99.0), 990);
        assert_eq!(at_percentile(&h, 99.99), 1000);
        assert_eq!(at_percentile(&h, 100.0), 1000);
        assert_eq!(at_percentile(&h, 0.0), 1);
    }

    #[test]
    fn merge_is_exact() {
        let mut a = Stats::default();
        let mut b = Stats::default();
        for i in 1..=1000 {
            a.record(200, i, 10);
            b.record(if i % 10 == 0 { 500 } else { 200 }, 1000 + i, 10);
        }
        b.timeouts = 2;
        a.merge(&b);
        assert_eq!(a.requests(), 2000);
        assert_eq!(a.status[&200], 1900);
        assert_eq!(a.status[&500], 100);
        assert_eq!(a.errors(), 2);
        assert_eq!(a.body_bytes, 20_000);
        let p50 = a.latency.value_at_percentile(50.0);
        assert!((995..=1005).contains(&p50), "{p50}");
        assert_eq!(a.latency.max(), a.latency.highest_equivalent(2000));
    }

    /// A server that answers in 1 ms but stalls for one second: at 1000
    /// requests/s, the requests that should have gone out during the stall
    /// are charged with the time they waited (coordinated omission
    /// corrected), so p50 reflects the stall and not just the one slow reply.
    #[test]
    fn coordinated_omission_is_corrected() {
        let mut sched = Schedule::new(1000.0, 0);
        let mut stats = Stats::default();
        let mut now_ns: u64 = 0;
        let stall_at = 1_000_000_000u64;
        let mut stalled = false;
        while sched.peek() < 2_000_000_000 {
            now_ns = now_ns.max(sched.peek());
            let (intended, late) = sched.take(now_ns);
            if late {
                stats.late += 1;
            }
            let mut service = 1_000_000; // 1 ms
            if !stalled && now_ns >= stall_at {
                service += 1_000_000_000;
                stalled = true;
            }
            now_ns += service;
            stats.record(200, corrected_latency_us(intended, now_ns), 0);
        }
        // Without correction only one request would exceed 1 s; with it,
        // about a third of the run's 2000 scheduled slots were delayed.
        let slow = stats.latency.count_between(100_000, MAX_US);
        assert!(slow > 900, "only {slow} slow requests");
        assert!(stats.late > 900, "{} late", stats.late);
        assert!(stats.latency.value_at_percentile(50.0) >= 1000);
        assert!(stats.latency.max() >= 1_000_000);
    }

    #[test]
    fn schedule_spacing() {
        let mut s = Schedule::new(100.0, 3_000_000);
        assert_eq!(s.interval_ns(), 10_000_000);
        assert_eq!(s.take(0).0, 3_000_000);
        assert_eq!(s.take(0).0, 13_000_000);
        let (t, late) = s.take(30_000_000);
        assert_eq!(t, 23_000_000);
        assert!(late);
    }

    #[test]
    fn hgrm_format() {
        let mut h = new_histogram();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let text = hgrm(&h);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("Percentile"));
        assert!(text.contains("#[Max     ="));
        assert!(text.contains("Total count    =        10000]"));
        // Java's footer: 2048 sub-buckets for 3 significant digits.
        assert!(text.contains("SubBuckets     =         2048]"), "{text}");
        // Values are in ms and increasing.
        let values: Vec<f64> = lines
            .iter()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
            .collect();
        assert!(values.windows(2).all(|w| w[0] <= w[1]));
        assert!((values.last().unwrap() - 10.0).abs() < 0.1);
        // TotalCount is cumulative and ends at the total.
        let counts: Vec<u64> = lines
            .iter()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
            .collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*counts.last().unwrap(), 10_000);
    }

    #[test]
    fn json_has_documented_fields() {
        let mut st = Stats::default();
        st.record(200, 100, 5);
        let r = Report {
            stats: st,
            duration: Duration::from_secs(1),
            rounds: vec![Round {
                latencies_us: vec![5, 7],
                failed: 0,
            }],
            url: "http://x/".into(),
            connections: 1,
            threads: 1,
            mode: "closed loop".into(),
        };
        let j = r.json();
        for f in [
            "\"requests\": 1",
            "\"duration_s\"",
            "\"rps\"",
            "\"errors\": 0",
            "\"status\": {\"200\": 1}",
            "\"p50\"",
            "\"p999\"",
            "\"max\"",
            "\"mean\"",
            "\"herd\"",
        ] {
            assert!(j.contains(f), "{f} missing from {j}");
        }
        let svg = svg(&r.stats.latency, "t");
        assert!(svg.starts_with("<svg") && svg.contains("polyline"));
        // The title is escaped once, `&` first.
        let svg = super::svg(&r.stats.latency, "a<b & c");
        assert!(svg.contains(">a&lt;b &amp; c<"), "{svg}");
    }
}
