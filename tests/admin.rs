//! The admin listener, statistics and the access log, end to end: a real
//! corral with `--admin 127.0.0.1:0` in front of a real origin.

mod common;

use common::*;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One request to the admin listener; the response.
fn admin(addr: SocketAddr, method: &str, path: &str) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    read_response(&mut BufReader::new(s), false).unwrap()
}

/// GETs `path` `n` times over one keep-alive connection; the statuses.
fn hammer(p: &Proxy, path: &str, n: usize) -> Vec<u16> {
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    (0..n)
        .map(|_| {
            let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
            w.write_all(req.as_bytes()).unwrap();
            read_response(&mut r, false).unwrap().status
        })
        .collect()
}

fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let r = admin(addr, "GET", "/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let lines = r
        .text()
        .lines()
        .map(|l| Ok(l.to_string()))
        .collect::<Vec<_>>();
    prometheus_parse::Scrape::parse(lines.into_iter()).expect("valid Prometheus text")
}

fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    match &found[0].value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        v => panic!("{name} is {v:?}"),
    }
}

#[test]
fn metrics_count_what_was_sent() {
    let origin = Origin::start();
    let b = origin.addr.to_string();
    let p = Proxy::start(&["--backend", &b, "--shards", "2", "--admin", "127.0.0.1:0"]);
    let a = p.admin_addr();
    // Over several connections, so both shards answer some.
    for _ in 0..5 {
        assert!(hammer(&p, "/size/100", 10).iter().all(|&c| c == 200));
    }
    for _ in 0..2 {
        assert!(hammer(&p, "/status/404", 3).iter().all(|&c| c == 404));
    }
    let cached = hammer(&p, "/cache/max-age=60/0/m", 8);
    assert!(cached.iter().all(|&c| c == 200));
    let s = scrape(a);
    assert_eq!(value(&s, "corral_requests_total", &[("code", "200")]), 58.0);
    assert_eq!(value(&s, "corral_requests_total", &[("code", "404")]), 6.0);
    assert_eq!(value(&s, "corral_cache_hits_total", &[]), 7.0);
    // /size and /status answers have no freshness: every one is a miss.
    assert_eq!(
        value(&s, "corral_cache_misses_total", &[]),
        50.0 + 6.0 + 1.0
    );
    assert_eq!(
        value(&s, "corral_origin_fetches_total", &[("pool", "default")]),
        origin.requests() as f64
    );
    assert_eq!(value(&s, "corral_backend_up", &[("backend", &b)]), 1.0);
    assert_eq!(
        value(&s, "corral_backend_inflight", &[("backend", &b)]),
        0.0
    );
    assert_eq!(value(&s, "corral_shards", &[]), 2.0);
    assert_eq!(value(&s, "corral_cache_entries", &[]), 1.0);
    let q: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric == "corral_request_duration_seconds")
        .collect();
    match &q[0].value {
        prometheus_parse::Value::Summary(qs) => {
            let quantiles: Vec<f64> = qs.iter().map(|c| c.quantile).collect();
            assert_eq!(quantiles, vec![0.5, 0.9, 0.99, 0.999]);
            assert!(qs.iter().all(|c| c.count > 0.0 && c.count < 10.0), "{qs:?}");
        }
        v => panic!("duration is {v:?}"),
    }
    assert_eq!(
        value(&s, "corral_request_duration_seconds_count", &[]),
        64.0
    );
    // The histogram export holds every request too.
    let h = admin(a, "GET", "/histogram").text();
    assert!(h.trim_start().starts_with("Value"), "{h}");
    let last = h
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .unwrap();
    let total: u64 = last.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert_eq!(total, 64, "{last}");
}

#[test]
fn status_is_json_with_the_documented_fields() {
    let origin = Origin::start();
    let b = origin.addr.to_string();
    let p = Proxy::start(&["--backend", &b, "--shards", "2", "--admin", "127.0.0.1:0"]);
    let a = p.admin_addr();
    hammer(&p, "/cache/max-age=60/0/s", 4);
    let r = admin(a, "GET", "/status");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("valid JSON");
    assert_eq!(v["shards"].as_array().unwrap().len(), 2);
    assert_eq!(v["requests"]["total"], 4);
    assert_eq!(v["requests"]["by_code"]["200"], 4);
    assert!(v["requests"]["latency_us"]["p99"].as_u64().unwrap() > 0);
    let backend = &v["pools"][0]["backends"][0];
    assert_eq!(v["pools"][0]["name"], "default");
    assert_eq!(v["pools"][0]["balance"], "round-robin");
    assert_eq!(backend["addr"], b.as_str());
    assert_eq!(backend["up"], true);
    assert_eq!(backend["ejected"], false);
    assert_eq!(backend["inflight"], 0);
    assert_eq!(backend["requests"], 1);
    assert_eq!(v["cache"]["entries"], 1);
    assert!(v["cache"]["bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["cache"]["hits"], 3);
    assert_eq!(v["cache"]["misses"], 1);
    assert!(v["collapse"]["collapsed"].is_u64());
    let per_shard: u64 = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(per_shard, 4);
    // The page: refreshing, no script, naming the backend.
    let page = admin(a, "GET", "/");
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(html.contains("http-equiv=\"refresh\""));
    assert!(!html.contains("<script"));
    assert!(html.contains(&b));
    assert_eq!(admin(a, "GET", "/nope").status, 404);
    let r = admin(a, "DELETE", "/status");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
}

#[test]
fn purge_drops_every_variant_of_a_path() {
    let origin = Origin::start();
    let b = origin.addr.to_string();
    let p = Proxy::start(&["--backend", &b, "--shards", "2", "--admin", "127.0.0.1:0"]);
    let a = p.admin_addr();
    let path = "/cache/max-age=60/0/p";
    for t in [
        path,
        "/cache/max-age=60/0/p?a=1",
        "/cache/max-age=60/0/p?a=2",
    ] {
        let r = get(p.addr, t);
        assert_eq!(r.status, 200);
        assert!(r.header("cache-status").unwrap().contains("stored"));
    }
    // `%70` is `p`: the same entry (RFC 9110 §4.2.3).
    for t in [path, "/cache/max-age=60/0/%70"] {
        assert!(get(p.addr, t)
            .header("cache-status")
            .unwrap()
            .contains("hit"));
    }
    let r = admin(
        a,
        "POST",
        &format!("/purge?path={}", path.replace('=', "%3D")),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["purged"], 3);
    // Gone from every shard's hot set too: the next ones are misses.
    for q in ["", "?a=1"] {
        let r = get(p.addr, &format!("{path}{q}"));
        assert!(!r.header("cache-status").unwrap().contains("hit"));
    }
    assert_eq!(admin(a, "POST", "/purge").status, 400);
    let r = admin(a, "GET", "/purge?path=/x");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    assert_eq!(r.header("via"), Some("1.1 corral"));
    // A `+` in the path is a plus, as in the stored target (query-form
    // decoding would look for a space and purge nothing).
    let plus = "/cache/max-age=60/0/c++x";
    assert!(get(p.addr, plus)
        .header("cache-status")
        .unwrap()
        .contains("stored"));
    let r = admin(
        a,
        "POST",
        &format!("/purge?path={}", plus.replace('=', "%3D")),
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["purged"], 1, "{}", r.text());
}

/// `file` in a test folder of its own (`name`), not there yet.
fn fresh_path(name: &str, file: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("corral-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(file);
    let _ = std::fs::remove_file(&path);
    path
}

#[test]
fn access_log_and_periodic_summary() {
    let origin = Origin::start();
    let log = fresh_path("alog", "access.log");
    let cfg = write_config(
        "alog",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nstats_interval = \"200ms\"\n\
             [log]\naccess = \"{}\"\nformat = \"json\"\n\
             [[pool]]\nname = \"app\"\nbackends = [{{ addr = \"{}\" }}]\n",
            log.display(),
            origin.addr
        ),
    );
    let p = Proxy::start(&["-c", &cfg]);
    hammer(&p, "/size/10", 5);
    hammer(&p, "/status/503", 1);
    // An HTTP/1.0 request, then one that does not parse on the same
    // connection: the second is logged as "-", not with the first's version.
    let bad = raw_exchange(
        p.addr,
        b"GET /size/10 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET\x01 / HTTP/1.1\r\n\r\n",
    );
    assert!(bad.contains(" 400 "), "{bad}");
    let t = Instant::now();
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 8 || t.elapsed() > Duration::from_secs(5) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let entries: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(entries.len(), 8, "{lines}");
    let unparsed = entries.iter().find(|e| e["status"] == 400).unwrap();
    assert_eq!(unparsed["version"], "-", "{lines}");
    assert_eq!(unparsed["method"], "-", "{lines}");
    assert!(entries
        .iter()
        .any(|e| e["version"] == "HTTP/1.0" && e["status"] == 200));
    // Each shard flushes its own buffer: lines of different connections
    // may interleave in any order.
    let ok: Vec<_> = entries
        .iter()
        .filter(|e| e["target"] == "/size/10" && e["version"] == "HTTP/1.1")
        .collect();
    assert_eq!(ok.len(), 5);
    assert!(ok
        .iter()
        .all(|e| e["method"] == "GET" && e["status"] == 200));
    assert!(ok.iter().all(|e| e["bytes"].as_u64().unwrap() > 10));
    let bad = entries
        .iter()
        .find(|e| e["target"] == "/status/503")
        .unwrap();
    assert_eq!(bad["status"], 503);
    assert_eq!(bad["cache"], "miss");
    // The summary line comes on stderr every interval.
    let t = Instant::now();
    while !p.stderr.lock().unwrap().contains("req/s") && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = p.stderr.lock().unwrap().clone();
    assert!(
        err.contains("req/s") && err.contains("backends 1/1 up"),
        "{err}"
    );
}

#[test]
fn the_access_log_keeps_every_line_through_a_graceful_stop() {
    // Lines still in the shards' buffers at SIGTERM reach the file before
    // the process ends (the writer thread used to be left behind), and a
    // log that cannot be written counts what it lost.
    // The log is a FIFO whose reader waits a second before reading: at
    // the stop, the writer is still blocked on it with buffers queued.
    let origin = Origin::start();
    let log = fresh_path("alog-stop", "access.fifo");
    let c = std::ffi::CString::new(log.display().to_string()).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo = log.clone();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::open(&fifo).unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        let mut text = String::new();
        std::io::Read::read_to_string(&mut f, &mut text).unwrap();
        text
    });
    let b = origin.addr.to_string();
    let path = log.display().to_string();
    let mut p = Proxy::start(&["--backend", &b, "--shards", "2", "--access-log", &path]);
    for _ in 0..4 {
        hammer(&p, "/size/10", 500);
    }
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(20)), Some(0));
    let text = reader.join().unwrap();
    assert_eq!(text.lines().count(), 2000);
    let _ = std::fs::remove_file(&log);
    // /dev/full: every write fails; the bytes are counted as dropped.
    let p = Proxy::start(&[
        "--backend",
        &b,
        "--shards",
        "1",
        "--access-log",
        "/dev/full",
        "--admin",
        "127.0.0.1:0",
        "--stats-interval",
        "50ms",
    ]);
    hammer(&p, "/size/10", 2000);
    let t = Instant::now();
    let mut dropped = 0.0;
    while dropped == 0.0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        dropped = metric_sum(p.admin_addr(), "corral_access_log_dropped_bytes_total");
    }
    assert!(dropped > 0.0);
    assert!(p
        .stderr
        .lock()
        .unwrap()
        .contains("cannot write the access log"));
}

#[test]
fn head_on_the_admin_listener_has_no_body() {
    // HEAD then GET on one kept-alive admin connection: the HEAD's head only
    // (its Content-Length is what GET would send), then the GET's answer.
    let origin = Origin::start();
    let b = origin.addr.to_string();
    let p = Proxy::start(&["--backend", &b, "--shards", "1", "--admin", "127.0.0.1:0"]);
    let s = TcpStream::connect(p.admin_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(b"HEAD /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")
        .unwrap();
    let h = read_response(&mut r, true).unwrap();
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty());
    assert!(h.header("content-length").is_some());
    w.write_all(b"GET /status HTTP/1.1\r\nHost: admin\r\n\r\n")
        .unwrap();
    let g = read_response(&mut r, false).unwrap();
    assert_eq!(g.status, 200);
    assert_eq!(g.header("content-type"), Some("application/json"));
}

#[test]
fn odd_admin_requests_get_their_answers() {
    let origin = Origin::start();
    let cfg = write_config(
        "admin-odd",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\nadmin = \"127.0.0.1:0\"\n\
             [limits]\nmax_header_bytes = \"256KiB\"\n\
             [[pool]]\nname = \"p\"\nbackends = [{{ addr = \"{}\" }}]\n",
            origin.addr
        ),
    );
    let p = Proxy::start(&["-c", &cfg]);
    let a = p.admin_addr();
    // An absolute-form target is its path (RFC 9112 §3.2.2).
    assert_eq!(admin(a, "GET", &format!("http://{a}/metrics")).status, 200);
    // A head within the configured limit but past 64 KiB is answered
    // (the read buffer stopped at 64 KiB: no answer at all).
    let big = "a".repeat(100 * 1024);
    let mut s = TcpStream::connect(a).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    assert_eq!(
        read_response(&mut BufReader::new(s), false).unwrap().status,
        200
    );
    // One past the limit gets its 431, even with more of it still coming
    // (read and dropped, not a reset under the answer).
    let huge = "a".repeat(300 * 1024);
    let s = TcpStream::connect(a).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = write!(
            w,
            "GET /status HTTP/1.1\r\nHost: a\r\nX-Big: {huge}{huge}\r\n\r\n"
        );
    });
    let r = read_response(&mut BufReader::new(s), false).unwrap();
    assert_eq!(r.status, 431);
    writer.join().unwrap();
    // A malformed request after a HEAD on the same connection: its 400
    // has its body (the HEAD's "no body" was carried over).
    let s = TcpStream::connect(a).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(b"HEAD /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut r, true).unwrap().status, 200);
    w.write_all(b"GET\x01 / HTTP/1.1\r\n\r\n").unwrap();
    let bad = read_response(&mut r, false).unwrap();
    assert_eq!(bad.status, 400);
    assert!(!bad.body.is_empty());
}

#[test]
fn backends_are_labelled_as_configured() {
    // A backend given by name is labelled by that name, not by the
    // address it resolved to (labels stay put when DNS changes).
    let origin = Origin::start();
    let name = format!("localhost:{}", origin.addr.port());
    let p = Proxy::start(&["--backend", &name, "--admin", "127.0.0.1:0"]);
    let s = scrape(p.admin_addr());
    assert!(
        s.samples
            .iter()
            .any(|x| x.metric == "corral_backend_up"
                && x.labels.get("backend") == Some(name.as_str())),
        "no corral_backend_up for {name}"
    );
}
