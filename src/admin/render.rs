//! Rendering the merged statistics (pure): Prometheus text exposition,
//! `/status` JSON, the HTML status page and the `.hgrm` histogram.

use super::stats::{Class, Merged};
use hdrhistogram::Histogram;
use std::fmt::Write;

/// What the shards share about one backend, read when rendering.
#[derive(Debug, Clone)]
pub struct BackendView {
    pub addr: String,
    pub weight: u32,
    pub up: bool,
    pub ejected: bool,
    /// Its current share of its weight, in thousandths (slow start; 0 when
    /// not usable).
    pub permille: u32,
    pub inflight: u32,
    pub ejections: u64,
}

#[derive(Debug, Clone)]
pub struct PoolView {
    pub name: String,
    pub balance: String,
    pub health_checks: bool,
    pub backends: Vec<BackendView>,
}

/// The process-wide state beside the shards' counters.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub version: &'static str,
    pub uptime_s: f64,
    pub pools: Vec<PoolView>,
    pub cache_enabled: bool,
    pub cache_entries: u64,
    pub cache_bytes: u64,
    pub cache_budget: u64,
    pub metrics: bool,
    /// Origin store names, in config order.
    pub stores: Vec<String>,
}

const QUANTILES: [(f64, &str); 4] = [
    (50.0, "0.5"),
    (90.0, "0.9"),
    (99.0, "0.99"),
    (99.9, "0.999"),
];

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Prometheus label value escaping.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A Prometheus summary: quantiles of the `recent` window (NaN when it
/// saw no request, as client libraries write), `_sum` and `_count` over
/// the process's life (`all`), as counters must be.
fn summary(
    out: &mut String,
    name: &str,
    labels: &str,
    recent: &Histogram<u64>,
    all: &Histogram<u64>,
) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (q, qs) in QUANTILES {
        let v = if recent.is_empty() {
            f64::NAN // printed as NaN
        } else {
            secs(recent.value_at_percentile(q))
        };
        let _ = writeln!(out, "{name}{{{labels}{sep}quantile=\"{qs}\"}} {v}");
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let sum = all.mean() * all.len() as f64 / 1e6;
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(out, "{name}_count{braces} {}", all.len());
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The Prometheus text exposition format (version 0.0.4).
pub fn prometheus(m: &Merged, v: &View) -> String {
    let t = &m.total;
    let mut o = String::with_capacity(8 * 1024);
    head(
        &mut o,
        "corral_requests_total",
        "counter",
        "Client requests answered, by status code.",
    );
    for (code, &n) in t.stats.codes.iter().enumerate() {
        if n > 0 {
            let _ = writeln!(o, "corral_requests_total{{code=\"{code}\"}} {n}");
        }
    }
    head(
        &mut o,
        "corral_cache_hits_total",
        "counter",
        "Requests answered from the cache.",
    );
    let _ = writeln!(o, "corral_cache_hits_total {}", t.cache.hits);
    head(
        &mut o,
        "corral_cache_misses_total",
        "counter",
        "Cache lookups that found nothing usable.",
    );
    let _ = writeln!(o, "corral_cache_misses_total {}", t.cache.misses);
    head(
        &mut o,
        "corral_collapsed_total",
        "counter",
        "Requests answered by joining another request's fetch.",
    );
    let _ = writeln!(o, "corral_collapsed_total {}", t.cache.collapsed);
    head(
        &mut o,
        "corral_cache_stored_total",
        "counter",
        "Responses stored in the cache.",
    );
    let _ = writeln!(o, "corral_cache_stored_total {}", t.cache.stored);
    head(
        &mut o,
        "corral_cache_entries",
        "gauge",
        "Objects in the cache.",
    );
    let _ = writeln!(o, "corral_cache_entries {}", v.cache_entries);
    head(
        &mut o,
        "corral_cache_bytes",
        "gauge",
        "Bytes the cache holds (bodies and heads).",
    );
    let _ = writeln!(o, "corral_cache_bytes {}", v.cache_bytes);
    head(
        &mut o,
        "corral_origin_fetches_total",
        "counter",
        "Requests sent to an upstream backend (retries included).",
    );
    for (p, pv) in t.pools.iter().zip(&v.pools) {
        let _ = writeln!(
            o,
            "corral_origin_fetches_total{{pool=\"{}\"}} {}",
            esc(&pv.name),
            p.fetches()
        );
    }
    let per_backend =
        |o: &mut String, name: &str, kind: &str, help: &str, f: &dyn Fn(usize, usize) -> String| {
            head(o, name, kind, help);
            for (pi, pv) in v.pools.iter().enumerate() {
                for (bi, b) in pv.backends.iter().enumerate() {
                    let _ = writeln!(
                        o,
                        "{name}{{pool=\"{}\",backend=\"{}\"}} {}",
                        esc(&pv.name),
                        esc(&b.addr),
                        f(pi, bi)
                    );
                }
            }
        };
    let b = |pi: usize, bi: usize| &v.pools[pi].backends[bi];
    per_backend(
        &mut o,
        "corral_backend_up",
        "gauge",
        "1 healthy, 0 down or ejected.",
        &|pi, bi| u8::from(b(pi, bi).up && !b(pi, bi).ejected).to_string(),
    );
    per_backend(
        &mut o,
        "corral_backend_inflight",
        "gauge",
        "Requests in flight to the backend, every shard.",
        &|pi, bi| b(pi, bi).inflight.to_string(),
    );
    per_backend(
        &mut o,
        "corral_backend_weight_ratio",
        "gauge",
        "Share of its weight in use (slow start), 0 when not usable.",
        &|pi, bi| (f64::from(b(pi, bi).permille) / 1000.0).to_string(),
    );
    per_backend(
        &mut o,
        "corral_backend_ejections_total",
        "counter",
        "Times passive checks ejected the backend.",
        &|pi, bi| b(pi, bi).ejections.to_string(),
    );
    let fig = |pi: usize, bi: usize| t.pools.get(pi).and_then(|p| p.backends.get(bi));
    per_backend(
        &mut o,
        "corral_backend_requests_total",
        "counter",
        "Requests sent to the backend.",
        &|pi, bi| fig(pi, bi).map_or(0, |f| f.sent).to_string(),
    );
    per_backend(
        &mut o,
        "corral_backend_failures_total",
        "counter",
        "Failed requests to the backend (connect, reset, timeout, a body cut short, a 5xx counted by eject.on_5xx).",
        &|pi, bi| fig(pi, bi).map_or(0, |f| f.failures).to_string(),
    );
    head(
        &mut o,
        "corral_backend_ttfb_seconds",
        "summary",
        "Time from sending a request to the backend's response head.",
    );
    for (pi, pv) in v.pools.iter().enumerate() {
        for (bi, bv) in pv.backends.iter().enumerate() {
            if let Some(f) = fig(pi, bi) {
                let labels = format!("pool=\"{}\",backend=\"{}\"", esc(&pv.name), esc(&bv.addr));
                // Over the process's life (no window kept per backend).
                summary(
                    &mut o,
                    "corral_backend_ttfb_seconds",
                    &labels,
                    &f.ttfb,
                    &f.ttfb,
                );
            }
        }
    }
    head(
        &mut o,
        "corral_request_duration_seconds",
        "summary",
        "Client request latency, head received to response sent; quantiles over the last minute.",
    );
    summary(
        &mut o,
        "corral_request_duration_seconds",
        "",
        &t.stats.recent_latency(),
        &t.stats.latency(),
    );
    head(
        &mut o,
        "corral_request_duration_by_cache_seconds",
        "summary",
        "Client request latency by cache class (hit, miss, pass); quantiles over the last minute.",
    );
    for c in Class::ALL {
        let labels = format!("cache=\"{}\"", c.name());
        summary(
            &mut o,
            "corral_request_duration_by_cache_seconds",
            &labels,
            &t.stats.recent[c as usize],
            &t.stats.by_class[c as usize],
        );
    }
    let store_counter =
        |o: &mut String, name: &str, help: &str, f: &dyn Fn(&super::stats::StoreFigures) -> u64| {
            head(o, name, "counter", help);
            for (st, sv) in t.stores.iter().zip(&v.stores) {
                let _ = writeln!(o, "{name}{{store=\"{}\"}} {}", esc(sv), f(st));
            }
        };
    store_counter(
        &mut o,
        "corral_store_reads_total",
        "I/O operations issued by the block reader.",
        &|s| s.reads,
    );
    store_counter(
        &mut o,
        "corral_store_read_bytes_total",
        "Bytes read from the store's files.",
        &|s| s.read_bytes,
    );
    store_counter(
        &mut o,
        "corral_store_blocks_requested_total",
        "Blocks that requests asked for.",
        &|s| s.blocks_requested,
    );
    store_counter(
        &mut o,
        "corral_store_merged_reads_total",
        "Reads that served more than one request.",
        &|s| s.merged_reads,
    );
    store_counter(
        &mut o,
        "corral_store_read_requests_total",
        "Requests served by reads, each counted once per read serving it.",
        &|s| s.read_requests,
    );
    store_counter(
        &mut o,
        "corral_store_blocks_read_total",
        "Blocks read, including gap blocks read to merge.",
        &|s| s.blocks_read,
    );
    store_counter(
        &mut o,
        "corral_store_blocks_wanted_total",
        "Blocks read that some request wanted (read amplification = read / wanted).",
        &|s| s.blocks_wanted,
    );
    store_counter(
        &mut o,
        "corral_store_block_cache_hits_total",
        "Requested blocks answered by the block cache.",
        &|s| s.block_cache_hits,
    );
    store_counter(
        &mut o,
        "corral_store_read_errors_total",
        "Failed reads.",
        &|s| s.read_errors,
    );
    head(
        &mut o,
        "corral_store_block_cache_bytes",
        "gauge",
        "Bytes in the store's block caches.",
    );
    for (st, sv) in t.stores.iter().zip(&v.stores) {
        let _ = writeln!(
            o,
            "corral_store_block_cache_bytes{{store=\"{}\"}} {}",
            esc(sv),
            st.cached_bytes
        );
    }
    head(
        &mut o,
        "corral_store_read_duration_seconds",
        "summary",
        "Time of one store read.",
    );
    for (st, sv) in t.stores.iter().zip(&v.stores) {
        summary(
            &mut o,
            "corral_store_read_duration_seconds",
            &format!("store=\"{}\"", esc(sv)),
            // Over the process's life (no window kept per store).
            &st.latency,
            &st.latency,
        );
    }
    head(
        &mut o,
        "corral_connections",
        "gauge",
        "Open client connections.",
    );
    let _ = writeln!(o, "corral_connections {}", t.connections);
    head(
        &mut o,
        "corral_connections_refused_total",
        "counter",
        "Client connections refused at max_connections (each got a 503; not in corral_requests_total).",
    );
    let _ = writeln!(o, "corral_connections_refused_total {}", t.refused);
    head(
        &mut o,
        "corral_shards",
        "gauge",
        "Shards (pinned executors).",
    );
    let _ = writeln!(o, "corral_shards {}", m.shards.len());
    head(
        &mut o,
        "corral_access_log_dropped_bytes_total",
        "counter",
        "Access log bytes dropped because the writer fell behind.",
    );
    let _ = writeln!(
        o,
        "corral_access_log_dropped_bytes_total {}",
        t.stats.log_dropped
    );
    head(
        &mut o,
        "corral_uptime_seconds",
        "gauge",
        "Seconds since start.",
    );
    let _ = writeln!(o, "corral_uptime_seconds {}", v.uptime_s);
    o
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    let at = |q: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_percentile(q)
        }
    };
    serde_json::json!({
        "p50": at(50.0), "p90": at(90.0), "p99": at(99.0), "p999": at(99.9),
        "max": h.max(), "mean": if h.is_empty() { 0.0 } else { h.mean() },
    })
}

/// `/status`: JSON with shards, pools and backends, cache and collapse.
pub fn status_json(m: &Merged, v: &View) -> String {
    let t = &m.total;
    let codes: serde_json::Map<String, serde_json::Value> = t
        .stats
        .codes
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(c, &n)| (c.to_string(), n.into()))
        .collect();
    let by_cache: serde_json::Map<String, serde_json::Value> = Class::ALL
        .iter()
        .map(|&c| {
            let h = &t.stats.by_class[c as usize];
            let mut p = percentiles(h);
            p["count"] = h.len().into();
            (c.name().to_string(), p)
        })
        .collect();
    let shards: Vec<serde_json::Value> = m
        .shards
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.shard,
                "connections": s.connections,
                "requests": s.stats.requests(),
                "latency_us": percentiles(&s.stats.latency()),
                "cache": { "hits": s.cache.hits, "misses": s.cache.misses,
                           "collapsed": s.cache.collapsed, "stored": s.cache.stored },
            })
        })
        .collect();
    let pools: Vec<serde_json::Value> = v
        .pools
        .iter()
        .enumerate()
        .map(|(pi, p)| {
            let figures = t.pools.get(pi);
            let backends: Vec<serde_json::Value> = p
                .backends
                .iter()
                .enumerate()
                .map(|(bi, b)| {
                    let f = figures.and_then(|f| f.backends.get(bi));
                    serde_json::json!({
                        "addr": b.addr, "weight": b.weight, "up": b.up, "ejected": b.ejected,
                        "weight_permille": b.permille, "inflight": b.inflight,
                        "ejections": b.ejections,
                        "requests": f.map_or(0, |f| f.sent),
                        "failures": f.map_or(0, |f| f.failures),
                        "ttfb_us": f.map(|f| percentiles(&f.ttfb)),
                    })
                })
                .collect();
            serde_json::json!({
                "name": p.name, "balance": p.balance, "health_checks": p.health_checks,
                "fetches": figures.map_or(0, |f| f.fetches()),
                "backends": backends,
            })
        })
        .collect();
    let lookups = t.cache.hits + t.cache.misses;
    let doc = serde_json::json!({
        "version": v.version,
        "uptime_s": v.uptime_s,
        "metrics": v.metrics,
        "shards": shards,
        "connections": t.connections,
        "requests": {
            "total": t.stats.requests(),
            "by_code": codes,
            "latency_us": percentiles(&t.stats.latency()),
            "by_cache": by_cache,
        },
        "pools": pools,
        "cache": {
            "enabled": v.cache_enabled, "entries": v.cache_entries, "bytes": v.cache_bytes,
            "budget": v.cache_budget, "hits": t.cache.hits, "misses": t.cache.misses,
            "stored": t.cache.stored,
            "hit_ratio": if lookups == 0 { 0.0 } else { t.cache.hits as f64 / lookups as f64 },
        },
        "collapse": { "collapsed": t.cache.collapsed },
        "stores": t.stores.iter().zip(&v.stores).map(|(st, name)| serde_json::json!({
            "name": name, "reads": st.reads, "read_bytes": st.read_bytes,
            "merged_reads": st.merged_reads, "read_requests": st.read_requests,
            "blocks_requested": st.blocks_requested,
            "block_cache_hits": st.block_cache_hits, "block_cache_bytes": st.cached_bytes,
            "read_errors": st.read_errors, "read_latency_us": percentiles(&st.latency),
        })).collect::<Vec<_>>(),
        "access_log_dropped_bytes": t.stats.log_dropped,
    });
    let mut s = serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

/// HTML text escaping.
fn h(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ms(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.0} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} ms", us as f64 / 1000.0)
    }
}

fn size(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// `/`: the status page, refreshing itself every 2 s, no JavaScript.
pub fn status_html(m: &Merged, v: &View) -> String {
    let t = &m.total;
    let mut o = String::with_capacity(16 * 1024);
    o.push_str(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <title>corral status</title><style>\
         body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}\
         h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}\
         table{border-collapse:collapse;background:#fff;margin-bottom:.5em}\
         th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}\
         th{background:#e8ecf1}td.l,th.l{text-align:left}\
         tr.up td.s{background:#c8f0c8}tr.down td.s{background:#f5b7b1}tr.ejected td.s{background:#fad7a0}\
         tr.ramp td.s{background:#e4f5c8}.muted{color:#777}</style></head><body>\n",
    );
    let _ = writeln!(
        o,
        "<h1>corral {}</h1><p class=\"muted\">up {:.0} s &middot; {} shard(s) &middot; {} open connection(s) &middot; {} requests answered{}</p>",
        h(v.version),
        v.uptime_s,
        m.shards.len(),
        t.connections,
        t.stats.requests(),
        if v.metrics { "" } else { " &middot; <b>metrics recording is off</b>" }
    );
    for (pi, p) in v.pools.iter().enumerate() {
        let figures = t.pools.get(pi);
        let _ = writeln!(
            o,
            "<h2>Pool {} <span class=\"muted\">({}{})</span></h2>",
            h(&p.name),
            h(&p.balance),
            if p.health_checks {
                ", active checks"
            } else {
                ", passive checks"
            }
        );
        o.push_str("<table><tr><th class=\"l\">backend</th><th class=\"l\">state</th><th>weight</th><th>in flight</th><th>requests</th><th>failures</th><th>ejections</th><th>TTFB p50</th><th>TTFB p99</th></tr>\n");
        for (bi, b) in p.backends.iter().enumerate() {
            let (class, state) = if !b.up {
                ("down", "DOWN".to_string())
            } else if b.ejected {
                ("ejected", "EJECTED".to_string())
            } else if b.permille < 1000 {
                ("ramp", format!("UP, slow start {}%", b.permille / 10))
            } else {
                ("up", "UP".to_string())
            };
            let f = figures.and_then(|f| f.backends.get(bi));
            let (p50, p99) = f.filter(|f| !f.ttfb.is_empty()).map_or(
                ("–".to_string(), "–".to_string()),
                |f| {
                    (
                        ms(f.ttfb.value_at_percentile(50.0)),
                        ms(f.ttfb.value_at_percentile(99.0)),
                    )
                },
            );
            let _ = writeln!(
                o,
                "<tr class=\"{class}\"><td class=\"l\">{}</td><td class=\"l s\">{state}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{p50}</td><td>{p99}</td></tr>",
                h(&b.addr),
                b.weight,
                b.inflight,
                f.map_or(0, |f| f.sent),
                f.map_or(0, |f| f.failures),
                b.ejections
            );
        }
        o.push_str("</table>\n");
    }
    o.push_str("<h2>Cache and collapsed forwarding</h2>\n");
    if v.cache_enabled {
        let lookups = t.cache.hits + t.cache.misses;
        let ratio = if lookups == 0 {
            0.0
        } else {
            100.0 * t.cache.hits as f64 / lookups as f64
        };
        let _ = writeln!(
            o,
            "<table><tr><th class=\"l\">objects</th><th>size</th><th>budget</th><th>hits</th><th>misses</th><th>hit ratio</th><th>stored</th><th>collapsed</th></tr>\
             <tr><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{ratio:.1}%</td><td>{}</td><td>{}</td></tr></table>",
            v.cache_entries,
            size(v.cache_bytes),
            size(v.cache_budget),
            t.cache.hits,
            t.cache.misses,
            t.cache.stored,
            t.cache.collapsed
        );
    } else {
        o.push_str("<p class=\"muted\">caching is off</p>\n");
    }
    if !v.stores.is_empty() {
        o.push_str("<h2>Origin stores</h2>\n<table><tr><th class=\"l\">store</th><th>blocks asked</th><th>from cache</th><th>reads</th><th>merged reads</th><th>bytes read</th><th>block cache</th><th>read p50</th><th>read p99</th></tr>\n");
        for (st, name) in t.stores.iter().zip(&v.stores) {
            let at = |q: f64| {
                if st.latency.is_empty() {
                    "–".to_string()
                } else {
                    ms(st.latency.value_at_percentile(q))
                }
            };
            let _ = writeln!(
                o,
                "<tr><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                h(name),
                st.blocks_requested,
                st.block_cache_hits,
                st.reads,
                st.merged_reads,
                size(st.read_bytes),
                size(st.cached_bytes),
                at(50.0),
                at(99.0)
            );
        }
        o.push_str("</table>\n");
    }
    o.push_str("<h2>Latency</h2>\n<table><tr><th class=\"l\">requests</th><th>count</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>\n");
    let mut row = |name: &str, hist: &Histogram<u64>| {
        let at = |q: f64| {
            if hist.is_empty() {
                "–".to_string()
            } else {
                ms(hist.value_at_percentile(q))
            }
        };
        let _ = writeln!(
            o,
            "<tr><td class=\"l\">{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            hist.len(),
            at(50.0),
            at(90.0),
            at(99.0),
            at(99.9),
            if hist.is_empty() { "–".to_string() } else { ms(hist.max()) }
        );
    };
    row("all", &t.stats.latency());
    for c in Class::ALL {
        row(c.name(), &t.stats.by_class[c as usize]);
    }
    o.push_str("</table>\n<h2>Shards</h2>\n<table><tr><th class=\"l\">shard</th><th>connections</th><th>requests</th><th>hits</th><th>misses</th><th>p99</th></tr>\n");
    for s in &m.shards {
        let _ = writeln!(
            o,
            "<tr><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            s.shard,
            s.connections,
            s.stats.requests(),
            s.cache.hits,
            s.cache.misses,
            {
                let l = s.stats.latency();
                if l.is_empty() { "–".to_string() } else { ms(l.value_at_percentile(99.0)) }
            }
        );
    }
    o.push_str("</table>\n<h2>Responses by status</h2>\n<table><tr>");
    for (code, &n) in t.stats.codes.iter().enumerate().filter(|(_, &n)| n > 0) {
        let _ = write!(o, "<th>{code}</th>");
        let _ = n;
    }
    o.push_str("</tr><tr>");
    for &n in t.stats.codes.iter().filter(|&&n| n > 0) {
        let _ = write!(o, "<td>{n}</td>");
    }
    o.push_str("</tr></table>\n<p class=\"muted\">Also: <a href=\"/metrics\">/metrics</a> &middot; <a href=\"/status\">/status</a> &middot; <a href=\"/histogram\">/histogram</a>. Refreshes every 2 s.</p>\n</body></html>\n");
    o
}

/// `/histogram`: the merged request latency as an HdrHistogram percentile
/// distribution (`.hgrm`, values in milliseconds).
pub fn hgrm(m: &Merged) -> String {
    loadgen::stats::hgrm(&m.total.stats.latency())
}
