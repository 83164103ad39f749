//! `corral demo`: a self-contained tour on loopback. Starts two built-in
//! origins and a proxy on port 0, drives them with loadgen's engine, and
//! narrates what happened. Needs nothing but this binary.

use crate::config::{self, Overrides};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A tiny threaded origin. `/obj/N`: 1 KiB, not cacheable; `/slow`: the same
/// after 20 ms; `/cached/N`: 1 KiB, fresh for a minute; `/herd/K`: fresh for
/// a minute, after 200 ms.
struct DemoOrigin {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl DemoOrigin {
    fn start() -> Result<DemoOrigin, String> {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("origin bind: {e}"))?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        let mut o = DemoOrigin {
            addr,
            served: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        o.listen(l)?;
        Ok(o)
    }

    fn listen(&mut self, l: TcpListener) -> Result<(), String> {
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        self.stop = Arc::new(AtomicBool::new(false));
        let (s, stop, conns) = (self.served.clone(), self.stop.clone(), self.conns.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        if let Ok(c) = conn.try_clone() {
                            if let Ok(mut v) = conns.lock() {
                                v.push(c);
                            }
                        }
                        let s = s.clone();
                        std::thread::spawn(move || serve(conn, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(())
    }

    /// Stops listening and cuts every connection, like a crashed server.
    fn kill(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(mut v) = self.conns.lock() {
            for c in v.drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Listens on the same port again.
    fn revive(&mut self) -> Result<(), String> {
        std::thread::sleep(Duration::from_millis(10));
        let l = TcpListener::bind(self.addr).map_err(|e| format!("origin rebind: {e}"))?;
        self.listen(l)
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

fn serve(conn: TcpStream, served: &AtomicU64) {
    let _ = conn.set_nodelay(true);
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    let body = vec![b'x'; 1024];
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
        }
        if line.contains("/slow") {
            std::thread::sleep(Duration::from_millis(20));
        }
        if line.contains("/herd") {
            std::thread::sleep(Duration::from_millis(200));
        }
        let probe = line.contains("/healthz");
        let cc = if line.contains("/cached") || line.contains("/herd") {
            "public, max-age=60"
        } else {
            "no-store"
        };
        if !probe {
            served.fetch_add(1, Ordering::Relaxed);
        }
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nCache-Control: {cc}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        if w.write_all(&out).is_err() {
            return;
        }
    }
}

/// One GET to the admin listener; the body.
fn admin_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).ok()?;
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn describe(r: &loadgen::Report) -> String {
    let h = &r.stats.latency;
    let codes: Vec<String> = r
        .stats
        .status
        .iter()
        .map(|(k, v)| format!("{v}× {k}"))
        .collect();
    // The status counts include the few requests in flight at the end,
    // answered after it; the rate counts those within the duration.
    let after = match r.stats.after_end {
        0 => String::new(),
        n => format!(" in all, {n} answered after the end"),
    };
    format!(
        "    {} requests in {:.1}s = {:.0} req/s ({}{after}; {} errors)\n    latency p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        r.stats.requests().saturating_sub(r.stats.after_end),
        r.duration.as_secs_f64(),
        r.rps(),
        codes.join(", "),
        r.stats.errors(),
        ms(h.value_at_percentile(50.0)),
        ms(h.value_at_percentile(90.0)),
        ms(h.value_at_percentile(99.0)),
        ms(h.value_at_percentile(99.9)),
        ms(h.max()),
    )
}

/// Runs the tour; `seconds` is its rough length (10 to 120).
pub fn run(seconds: u64) -> Result<(), String> {
    let phase = Duration::from_millis((seconds.clamp(10, 120) * 1000) / 10);
    println!("corral demo: a shard-per-core reverse proxy on io_uring, on loopback only.\n");
    let a = DemoOrigin::start()?;
    let b = DemoOrigin::start()?;
    let mut c = DemoOrigin::start()?;
    let shards = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(2);
    let ov = Overrides {
        listen: vec!["127.0.0.1:0".into()],
        backends: vec![
            format!("{},weight=3", a.addr),
            b.addr.to_string(),
            c.addr.to_string(),
        ],
        health_path: Some("/healthz".into()),
        health_interval: Some("250ms".into()),
        admin: Some("127.0.0.1:0".into()),
        shards: Some(shards),
        // One shard per CPU, pinned to the first CPUs this process may
        // run on.
        cpus: crate::shard::allowed_cpus()
            .filter(|a| a.len() >= shards)
            .map(|a| {
                a[..shards]
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            }),
        ..Default::default()
    };
    // An origin store: a 16 MiB file under <tmp>/files/, routed by /files/.
    let store_root = std::env::temp_dir().join(format!("corral-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store_root);
    // Removed however the tour ends (a step that fails returns early).
    let _cleanup = RemoveOnDrop(store_root.clone());
    std::fs::create_dir_all(store_root.join("files")).map_err(|e| format!("demo store: {e}"))?;
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(store_root.join("files/data.bin"), &data)
        .map_err(|e| format!("demo store: {e}"))?;
    let file = config::parse_file(&format!(
        "[[store]]\nname = \"files\"\nroot = \"{}\"\n[[route]]\npath_prefix = \"/files/\"\nto = \"files\"\n",
        store_root.display()
    ))
    .map_err(|e| e.to_string())?;
    let cfg = config::build(file, &ov, crate::shard::online_cpus()).map_err(|e| e.to_string())?;
    let running = crate::shard::start(cfg).map_err(|e| e.to_string())?;
    let proxy = running.addrs[0];
    println!(
        "1. Started three origins ({} with weight 3, {} and {} with weight 1) and corral on {}\n   with {} shard(s), each a pinned glommio executor with its own SO_REUSEPORT listener.\n   corral checks each origin's /healthz every 250 ms.\n",
        a.addr, b.addr, c.addr, proxy, shards
    );

    let load = |path: &str, f: &dyn Fn(&mut loadgen::Options)| -> Result<loadgen::Report, String> {
        let mut o = loadgen::Options::new(&format!("http://{proxy}{path}"))?;
        o.connections = 32;
        o.duration = phase;
        f(&mut o);
        loadgen::run(o)
    };

    println!(
        "2. Pass-through: 32 keep-alive connections, closed loop, 1 KiB objects, for {:.1}s.",
        phase.as_secs_f64()
    );
    let r = load("/obj/1", &|_| {})?;
    println!("{}", describe(&r));
    let (na, nb, nc) = (a.served(), b.served(), c.served());
    println!(
        "    smooth weighted round robin sent {na} : {nb} : {nc} requests to the origins ({:.2} : 1 : {:.2}).\n",
        na as f64 / nb.max(1) as f64,
        nc as f64 / nb.max(1) as f64
    );

    println!(
        "3. Failover: the same load, and a third of the way in the third origin dies (its port"
    );
    println!(
        "   refuses, its open connections are cut). Requests that fail before any response byte"
    );
    println!("   are retried on another origin; health checks take it out of rotation.");
    let (b0, c0) = (b.served(), c.served());
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(phase / 3);
            c.kill();
        });
        load("/obj/1", &|_| {})
    })?;
    println!("{}", describe(&r));
    println!(
        "    the dead origin answered {} requests before it died, the weight-1 survivor {}.",
        c.served() - c0,
        b.served() - b0
    );
    c.revive()?;
    std::thread::sleep(Duration::from_millis(900));
    let c1 = c.served();
    let r = load("/obj/1", &|_| {})?;
    let back = c.served() - c1;
    if back > 0 {
        println!(
            "    revived and seen healthy again (rise = 2 checks), it served {back} of the next {} requests.\n",
            r.stats.requests()
        );
    } else {
        println!(
            "    revived, but not back in rotation yet: it served none of the next {} requests.\n",
            r.stats.requests()
        );
    }

    println!("4. Pipelining: 8 requests in flight per connection, answered in order.");
    let r = load("/obj/2", &|o| o.pipeline = 8)?;
    println!("{}\n", describe(&r));

    println!("5. Open loop at 2000 req/s against a 20 ms origin path: latency counts from each");
    println!(
        "   request's intended send time, so stalls cannot hide (coordinated omission corrected)."
    );
    let r = load("/slow", &|o| {
        o.rate = Some(2000.0);
        o.connections = 64;
    })?;
    println!("{}", describe(&r));
    println!(
        "    requests sent late (>1 ms behind schedule): {}\n",
        r.stats.late
    );

    println!("6. Many keys: 10,000 distinct URLs with a zipf(1.0) popularity, streamed through.");
    let r = load("/obj/{key}", &|o| {
        o.keys = Some(10_000);
        o.dist = loadgen::keys::Dist::Zipf(1.0);
    })?;
    println!("{}\n", describe(&r));

    let served = || a.served() + b.served() + c.served();
    println!("7. The cache: 32 connections asking for one object that is fresh for a minute.");
    let before = served();
    let r = load("/cached/1", &|_| {})?;
    println!("{}", describe(&r));
    let asked = served() - before;
    if asked == 1 {
        println!(
            "    the origins were asked once: stored once, in its owner shard; every other answer came from memory.\n"
        );
    } else {
        println!("    the origins were asked {asked} times.\n");
    }

    println!(
        "8. A thundering herd: 200 connections ask for the same never-seen object at the same"
    );
    println!(
        "   instant, round after round; the origin takes 200 ms. Collapsed forwarding turns each"
    );
    println!("   herd into one origin fetch, whatever the shard count, streamed to every waiter.");
    let before = served();
    let r = load("/herd/{key}", &|o| {
        o.herd = true;
        o.connections = 200;
    })?;
    let rounds = r.rounds.len().max(1) as u64;
    println!(
        "    {} rounds, {} requests, {} origin fetches ({:.1} per round, {} shard(s)); slowest response per round: {}\n",
        r.rounds.len(),
        r.stats.requests(),
        served() - before,
        (served() - before) as f64 / rounds as f64,
        shards,
        r.rounds.iter().map(|x| ms(x.max_us())).collect::<Vec<_>>().join(", ")
    );

    println!("9. The origin store: 32 connections read random 16 KiB ranges of a 16 MiB file under /files/,");
    let how = match crate::origin::store::direct_io(&store_root) {
        (true, _) => "read with O_DIRECT".to_string(),
        (false, why) => format!("read buffered ({why})"),
    };
    println!(
        "   {how} in 4 KiB blocks; reads of neighbouring blocks merge, hot blocks stay cached."
    );
    let r = load("/files/data.bin", &|o| {
        o.range = Some(16 << 10);
        o.object_size = Some(16 << 20);
    })?;
    println!("{}", describe(&r));
    if let Some(admin) = running.admin {
        let text = admin_get(admin, "/metrics").unwrap_or_default();
        let get = |name: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        let reads = get("corral_store_reads_total");
        println!(
            "    {:.0} store reads for {} requests ({:.1} requests per read), {:.1} MiB read for {:.1} MiB served.\n",
            reads,
            r.stats.requests(),
            r.stats.requests() as f64 / reads.max(1.0),
            get("corral_store_read_bytes_total") / (1 << 20) as f64,
            r.stats.requests() as f64 * 16.0 / 1024.0
        );
    }

    if let Some(admin) = running.admin {
        println!("10. Observability: every shard counts on its own; the admin listener at http://{admin}/");
        println!("   (status page, /metrics, /status, /histogram) merges them when asked. From /metrics:");
        let text = admin_get(admin, "/metrics").unwrap_or_default();
        for line in text.lines().filter(|l| {
            l.starts_with("corral_requests_total")
                || l.starts_with("corral_cache_hits_total")
                || l.starts_with("corral_collapsed_total")
                || l.starts_with("corral_backend_up")
                || l.starts_with("corral_request_duration_seconds{quantile=\"0.99\"}")
        }) {
            println!("    {line}");
        }
        println!();
    }

    println!(
        "11. Graceful shutdown: stop accepting, finish in-flight requests, close idle connections."
    );
    running.stop();
    running.join();
    println!("    all shards drained and stopped.\n");
    Ok(())
}

/// A folder removed when this goes out of scope.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
