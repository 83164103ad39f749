//! `corral demo`: a self-contained tour on loopback. Starts two built-in
//! origins and a proxy on port 0, drives them with loadgen's engine, and
//! narrates what happened. Needs nothing but this binary.

use crate::config::{self, Overrides};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A tiny threaded origin. `/obj/N`: 1 KiB, not cacheable; `/slow`: the same
/// after 20 ms; `/cached/N`: 1 KiB, fresh for a minute; `/herd/K`: fresh for
/// a minute, after 200 ms.
struct DemoOrigin {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
}

impl DemoOrigin {
    fn start() -> Result<DemoOrigin, String> {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("origin bind: {e}"))?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        let served = Arc::new(AtomicU64::new(0));
        let s = served.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve(conn, &s));
            }
        });
        Ok(DemoOrigin { addr, served })
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
        let cc = if line.contains("/cached") || line.contains("/herd") {
            "public, max-age=60"
        } else {
            "no-store"
        };
        served.fetch_add(1, Ordering::Relaxed);
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
    format!(
        "    {} requests in {:.1}s = {:.0} req/s ({}; {} errors)\n    latency p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        r.stats.requests(),
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

/// Runs the tour; `seconds` is its rough length.
pub fn run(seconds: u64) -> Result<(), String> {
    let phase = Duration::from_millis((seconds.clamp(8, 120) * 1000) / 8);
    println!("corral demo: a shard-per-core reverse proxy on io_uring, on loopback only.\n");
    let a = DemoOrigin::start()?;
    let b = DemoOrigin::start()?;
    let shards = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(2);
    let ov = Overrides {
        listen: vec!["127.0.0.1:0".into()],
        backends: vec![format!("{},weight=3", a.addr), b.addr.to_string()],
        shards: Some(shards),
        ..Default::default()
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cfg = config::build(config::FileConfig::default(), &ov, cpus).map_err(|e| e.to_string())?;
    let running = crate::shard::start(cfg).map_err(|e| e.to_string())?;
    let proxy = running.addrs[0];
    println!(
        "1. Started two origins ({} with weight 3, {} with weight 1) and corral on {} with {} shard(s),\n   each shard a pinned glommio executor with its own SO_REUSEPORT listener.\n",
        a.addr, b.addr, proxy, shards
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
    let (na, nb) = (
        a.served.load(Ordering::Relaxed),
        b.served.load(Ordering::Relaxed),
    );
    println!(
        "    smooth weighted round robin sent {na} to the weight-3 origin and {nb} to the weight-1 origin ({:.2} : 1).\n",
        na as f64 / nb.max(1) as f64
    );

    println!("3. Pipelining: 8 requests in flight per connection, answered in order.");
    let r = load("/obj/2", &|o| o.pipeline = 8)?;
    println!("{}\n", describe(&r));

    println!("4. Open loop at 2000 req/s against a 20 ms origin path: latency counts from each");
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

    println!("5. Many keys: 10,000 distinct URLs with a zipf(1.0) popularity, streamed through.");
    let r = load("/obj/{key}", &|o| {
        o.keys = Some(10_000);
        o.dist = loadgen::keys::Dist::Zipf(1.0);
    })?;
    println!("{}\n", describe(&r));

    let served = || a.served.load(Ordering::Relaxed) + b.served.load(Ordering::Relaxed);
    println!("6. The cache: 32 connections asking for one object that is fresh for a minute.");
    let before = served();
    let r = load("/cached/1", &|_| {})?;
    println!("{}", describe(&r));
    println!(
        "    the origins were asked {} time(s): stored once, in its owner shard; every other answer came from memory.\n",
        served() - before
    );

    println!(
        "7. A thundering herd: 200 connections ask for the same never-seen object at the same"
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

    println!(
        "8. Graceful shutdown: stop accepting, finish in-flight requests, close idle connections."
    );
    running.stop();
    running.join();
    println!("    all shards drained and stopped.\n");
    println!("Not in this build yet (see the README): health checks and failover, the other");
    println!("balancers, the origin store, and the admin listener.");
    Ok(())
}
