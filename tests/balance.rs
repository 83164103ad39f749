//! Load balancing, health checks and failover, end to end: real corral
//! processes in front of real backends on loopback that the tests kill,
//! hang and revive.

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NORMAL: u8 = 0;
/// Reads requests, never answers.
const HANG: u8 = 1;
/// Reads a request, then closes without answering.
const DIE: u8 = 2;
/// Answers a head promising 100 bytes, sends 10 and closes.
const CUT: u8 = 3;
/// The same with a 500 head.
const CUT_500: u8 = 4;

/// A backend that names itself in every answer (`X-Backend`), counts what
/// it serves, and can be killed (listener and connections closed), hung,
/// slowed down, and revived on the same port.
struct Backend {
    name: String,
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    delay_ms: Arc<AtomicU64>,
    /// Requests answered (health checks not counted).
    served: Arc<AtomicUsize>,
    /// Requests received, by method (health checks not counted).
    received: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    /// Field lines added to every answer (each ending in CRLF).
    extra: Arc<Mutex<String>>,
}

impl Backend {
    fn start(name: &str) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut b = Backend {
            name: name.into(),
            addr: l.local_addr().unwrap(),
            mode: Arc::new(AtomicU8::new(NORMAL)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            served: Arc::new(AtomicUsize::new(0)),
            received: Arc::new(Mutex::new(HashMap::new())),
            stop: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
            extra: Arc::new(Mutex::new(String::new())),
        };
        b.serve(l);
        b
    }

    fn serve(&mut self, l: TcpListener) {
        l.set_nonblocking(true).unwrap();
        self.stop = Arc::new(AtomicBool::new(false));
        let (stop, conns) = (self.stop.clone(), self.conns.clone());
        let (name, mode, delay, served, received, extra) = (
            self.name.clone(),
            self.mode.clone(),
            self.delay_ms.clone(),
            self.served.clone(),
            self.received.clone(),
            self.extra.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_nodelay(true).unwrap();
                        conns.lock().unwrap().push(s.try_clone().unwrap());
                        let ctx = Ctx {
                            name: name.clone(),
                            mode: mode.clone(),
                            delay: delay.clone(),
                            served: served.clone(),
                            received: received.clone(),
                            stop: stop.clone(),
                            extra: extra.clone(),
                        };
                        std::thread::spawn(move || {
                            let _ = serve_conn(s, &ctx);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
    }

    /// Closes the listener and every connection: the port refuses.
    fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // The accept loop polls every 2 ms.
        std::thread::sleep(Duration::from_millis(20));
    }

    /// Listens on the same port again.
    fn revive(&mut self) {
        let l = TcpListener::bind(self.addr).unwrap();
        self.serve(l);
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    fn received(&self, method: &str) -> usize {
        *self.received.lock().unwrap().get(method).unwrap_or(&0)
    }
}

/// What one backend connection's thread shares with the test.
struct Ctx {
    name: String,
    mode: Arc<AtomicU8>,
    delay: Arc<AtomicU64>,
    served: Arc<AtomicUsize>,
    received: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<AtomicBool>,
    extra: Arc<Mutex<String>>,
}

fn serve_conn(s: TcpStream, ctx: &Ctx) -> std::io::Result<()> {
    let Ctx {
        name,
        mode,
        delay,
        served,
        received,
        stop,
        extra,
    } = ctx;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut len = 0usize;
        let mut host = String::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Ok(());
            }
            if h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                } else if k.eq_ignore_ascii_case("host") {
                    host = v.trim().to_string();
                }
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        if path == "/healthz" {
            w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")?;
            return w.shutdown(std::net::Shutdown::Both);
        }
        *received.lock().unwrap().entry(method).or_default() += 1;
        match mode.load(Ordering::SeqCst) {
            HANG => {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return Ok(());
            }
            DIE => return w.shutdown(std::net::Shutdown::Both),
            CUT => {
                w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")?;
                return w.shutdown(std::net::Shutdown::Both);
            }
            CUT_500 => {
                w.write_all(b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\n0123456789")?;
                return w.shutdown(std::net::Shutdown::Both);
            }
            _ => {}
        }
        let d = delay.load(Ordering::SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_millis(d));
        }
        served.fetch_add(1, Ordering::SeqCst);
        // /cached/...: fresh for a second, usable stale for a minute on error.
        let cc = if path.starts_with("/cached/") {
            "Cache-Control: max-age=1, stale-if-error=60\r\n"
        } else {
            ""
        };
        let extra = extra.lock().unwrap().clone();
        let out = format!(
            "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nX-Host: {host}\r\n{cc}{extra}Content-Length: {}\r\n\r\n{name}",
            name.len()
        );
        w.write_all(out.as_bytes())?;
    }
}

/// A config with one pool over `backends` and `pool_extra` lines.
fn config(test: &str, backends: &[&Backend], dead: &[SocketAddr], pool_extra: &str) -> String {
    let mut list: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ addr = \"{}\" }}", b.addr))
        .collect();
    list.extend(dead.iter().map(|a| format!("{{ addr = \"{a}\" }}")));
    write_config(
        test,
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n[cache]\nsize = 0\n\
             [[pool]]\nname = \"app\"\nbackends = [{}]\n{pool_extra}\n",
            list.join(", ")
        ),
    )
}

/// Three backends named `names` and a corral in front of them.
fn three(test: &str, names: [&str; 3], pool_extra: &str) -> ([Backend; 3], Proxy) {
    let bs = names.map(Backend::start);
    let path = config(test, &[&bs[0], &bs[1], &bs[2]], &[], pool_extra);
    let p = Proxy::start(&["-c", &path]);
    (bs, p)
}

/// GETs from `threads` clients for `how_long`; every status they got.
fn load_for(p: &Proxy, threads: usize, how_long: Duration) -> Vec<u16> {
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(p, threads, stop.clone());
    std::thread::sleep(how_long);
    stop.store(true, Ordering::SeqCst);
    clients
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// A port nothing listens on.
fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A keep-alive client for one connection.
struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Client {
    fn new(p: &Proxy) -> Client {
        let s = p.connect();
        Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }

    fn get(&mut self, path: &str, extra: &str) -> Response {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n");
        self.w.write_all(req.as_bytes()).unwrap();
        read_response(&mut self.r, false).unwrap()
    }

    fn post(&mut self, path: &str) -> Response {
        let req = format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
        self.w.write_all(req.as_bytes()).unwrap();
        read_response(&mut self.r, false).unwrap()
    }
}

/// Waits until the proxy's log contains `text`; how long it took.
fn wait_log(p: &Proxy, text: &str, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if p.stderr.lock().unwrap().contains(text) {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Runs `threads` clients sending GETs until `stop`; returns the statuses.
fn load(
    p: &Proxy,
    threads: usize,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<u16>>> {
    (0..threads)
        .map(|_| {
            let addr = p.addr;
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut codes = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut c: Option<Client> = None;
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let cl = c.get_or_insert_with(|| {
                        let s = TcpStream::connect(addr).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                        Client {
                            w: s.try_clone().unwrap(),
                            r: BufReader::new(s),
                        }
                    });
                    if cl
                        .w
                        .write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
                        .is_err()
                    {
                        codes.push(0);
                        c = None;
                        continue;
                    }
                    match read_response(&mut cl.r, false) {
                        Ok(r) => {
                            if r.header("connection") == Some("close") {
                                c = None;
                            }
                            codes.push(r.status)
                        }
                        Err(_) => {
                            codes.push(0);
                            c = None;
                        }
                    }
                }
                codes
            })
        })
        .collect()
}

#[test]
fn round_robin_follows_weights() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let path = write_config(
        "rr-weights",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n[[pool]]\nname = \"app\"\n\
             backends = [{{ addr = \"{}\", weight = 3 }}, {{ addr = \"{}\" }}]\n",
            a.addr, b.addr
        ),
    );
    let p = Proxy::start(&["-c", &path]);
    let mut c = Client::new(&p);
    let mut seq = String::new();
    for i in 0..40 {
        let r = c.get(&format!("/n{i}"), "");
        assert_eq!(r.status, 200);
        seq.push_str(r.header("x-backend").unwrap());
    }
    assert_eq!((a.served(), b.served()), (30, 10));
    // Smooth: b comes every fourth request, never a burst of a's.
    assert!(seq.starts_with("aabaaaba") || seq.contains("aaba"), "{seq}");
    assert!(!seq.contains("aaaa"), "{seq}");
}

#[test]
fn a_killed_backend_is_detected_absorbed_and_readmitted_with_slow_start() {
    killed_and_readmitted("round-robin");
}

#[test]
fn peak_ewma_keeps_slow_start_for_a_returning_backend() {
    // Its latency estimate decayed to nothing while it was down: without a
    // reset it won every choice it was offered on return (half the
    // traffic at once, slow start or not).
    killed_and_readmitted("peak-ewma");
}

fn killed_and_readmitted(balance: &str) {
    let [a, mut b, c] = ["a", "b", "c"].map(Backend::start);
    let path = config(
        &format!("kill-{balance}"),
        &[&a, &b, &c],
        &[],
        &format!(
            "balance = \"{balance}\"\n\
             health = {{ path = \"/healthz\", interval = \"200ms\", timeout = \"100ms\", rise = 2, fall = 2 }}\n\
             slow_start = \"3s\"\nretries = 2\n"
        ),
    );
    let p = Proxy::start(&["-c", &path, "--admin", "127.0.0.1:0"]);
    let admin = p.admin_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(&p, 4, stop.clone());
    std::thread::sleep(Duration::from_millis(600));
    let before = b.served();
    assert!(before > 0, "b got no traffic before the kill");
    b.kill();
    let down = format!("backend {} is DOWN", b.addr);
    let took = wait_log(&p, &down, Duration::from_secs(5)).expect("kill not detected");
    // fall × interval, plus one interval of phase and scheduling slack.
    assert!(
        took <= Duration::from_millis(2 * 200 + 400),
        "detected after {took:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    b.revive();
    let up = format!("backend {} is UP", b.addr);
    let took = wait_log(&p, &up, Duration::from_secs(5)).expect("revival not detected");
    assert!(
        took <= Duration::from_millis(2 * 200 + 400),
        "back after {took:?}"
    );
    // Slow start: b's weight, and with it its share of requests, grows
    // over its three seconds. The weight is read from /metrics at the end
    // of each second measured.
    let share = |secs: u64| {
        let (b0, t0) = (b.served(), a.served() + c.served());
        std::thread::sleep(Duration::from_secs(secs));
        let (db, dt) = (b.served() - b0, a.served() + c.served() - t0);
        let weight = weight_ratio(admin, b.addr);
        (db as f64 / (db + dt).max(1) as f64, weight)
    };
    let (early, early_weight) = share(1);
    std::thread::sleep(Duration::from_millis(1500));
    let (late, late_weight) = share(1);
    stop.store(true, Ordering::SeqCst);
    let codes: Vec<u16> = clients
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let errors = codes.iter().filter(|&&c| c != 200).count();
    assert!(codes.len() > 200, "only {} requests", codes.len());
    assert_eq!(
        errors,
        0,
        "retries should absorb the kill: {:?}\n{}",
        codes.iter().filter(|&&c| c != 200).collect::<Vec<_>>(),
        p.stderr.lock().unwrap()
    );
    assert!(b.served() > before, "b got no traffic after coming back");
    let shares = format!(
        "share {early:.2} and weight {early_weight:.2} after the first second, \
         {late:.2} and {late_weight:.2} after the fourth"
    );
    eprintln!("{balance}: {shares}");
    // The ramp itself, from the balancer: about a third of the way after
    // the first of the three seconds (half at most, for a late scrape on a
    // busy machine), most of the way after the fourth.
    assert!(
        early_weight <= 0.5 && late_weight >= 0.8 && early_weight < late_weight,
        "slow start: {shares}"
    );
    if balance == "peak-ewma" {
        // Shares follow measured latency too, so they only bound the bug
        // this guards against: a returning backend whose estimate decayed
        // to nothing won every choice it was offered (two in three with
        // three backends) from its first second.
        assert!(early < 0.4 && late > 0.0, "slow start: {shares}");
    } else {
        assert!(early < late * 0.8 && late > 0.2, "slow start: {shares}");
    }
}

#[test]
fn a_5xx_cut_mid_body_is_one_failure() {
    // With on_5xx the 500 head is a failure; its body breaking off is the
    // same attempt, not a second one (it was counted twice, ejecting
    // twice as fast and inflating corral_backend_failures_total).
    let a = Backend::start("cut500");
    a.mode.store(CUT_500, Ordering::SeqCst);
    let path = config(
        "cut-500",
        &[&a],
        &[],
        "eject = { failures = 5, on_5xx = true, cooldown = \"30s\" }\n",
    );
    let p = Proxy::start(&["-c", &path, "--admin", "127.0.0.1:0"]);
    let out = raw_exchange(
        p.addr,
        b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 500"));
    assert_eq!(a.received("GET"), 1);
    // Both counts happen before the client connection closes, and a scrape
    // asks the shards for their figures as of now; a second failure would
    // be in by this time.
    std::thread::sleep(Duration::from_millis(300));
    let failures =
        backend_metric(p.admin_addr(), "corral_backend_failures_total", a.addr).unwrap_or(0.0);
    assert_eq!(failures, 1.0);
}

/// A per-backend metric of `backend` from the admin listener, with the
/// whole scrape when it is not there.
fn backend_metric(admin: SocketAddr, name: &str, backend: SocketAddr) -> Result<f64, String> {
    let body = raw_exchange(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    let label = format!("backend=\"{backend}\"");
    body.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .ok_or(body)
}

/// `corral_backend_weight_ratio` of `backend`, from the admin listener.
fn weight_ratio(admin: SocketAddr, backend: SocketAddr) -> f64 {
    backend_metric(admin, "corral_backend_weight_ratio", backend)
        .unwrap_or_else(|body| panic!("no weight ratio for {backend} in:\n{body}"))
}

#[test]
fn refused_requests_fail_over_and_the_backend_is_ejected() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let dead = dead_addr();
    let path = config(
        "eject",
        &[&a, &b],
        &[dead],
        "eject = { failures = 2, cooldown = \"30s\" }\n",
    );
    let p = Proxy::start(&["-c", &path, "--shards", "1"]);
    let mut c = Client::new(&p);
    // A shard that cannot connect holds the backend back for a moment, so
    // the failures that eject it come one per hold: keep asking till then.
    let ejected = format!("backend {dead} ejected");
    let t = Instant::now();
    let mut sent = 0;
    while t.elapsed() < Duration::from_secs(5) && !p.stderr.lock().unwrap().contains(&ejected) {
        assert_eq!(c.get(&format!("/g{sent}"), "").status, 200, "GET {sent}");
        // A POST that never reached the dead backend is safe to retry.
        assert_eq!(c.post("/p").status, 200, "POST {sent}");
        sent += 2;
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        p.stderr.lock().unwrap().contains(&ejected),
        "{}",
        p.stderr.lock().unwrap()
    );
    assert!(a.received("POST") + b.received("POST") == sent / 2);
    assert_eq!(a.served() + b.served(), sent);
}

#[test]
fn the_last_usable_backend_is_never_ejected() {
    // One backend, refusing (a restart): its failures are 502s, and it is
    // not ejected, so it serves again as soon as it is back instead of
    // `cooldown` of 503s.
    let dead = dead_addr();
    let path = write_config(
        "last-usable",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n[cache]\nsize = 0\n\
             [[pool]]\nname = \"app\"\nbackends = [{{ addr = \"{dead}\" }}]\n\
             eject = {{ failures = 2, cooldown = \"30s\" }}\n"
        ),
    );
    let p = Proxy::start(&["-c", &path]);
    let mut c = Client::new(&p);
    for i in 0..10 {
        assert_eq!(c.get(&format!("/x{i}"), "").status, 502, "request {i}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.get("/y", "").status, 502);
    assert!(
        !p.stderr.lock().unwrap().contains("ejected"),
        "{}",
        p.stderr.lock().unwrap()
    );
}

#[test]
fn health_checks_send_the_configured_host() {
    // A name-based virtual host answers its own name only: checks that
    // sent the resolved address would take it down. `health.host` names
    // it; without it the backend as configured is the Host.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let hosts = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = hosts.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut head = String::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 2 {
                head.push_str(&line);
                line.clear();
            }
            let host = head
                .lines()
                .find_map(|l| l.strip_prefix("Host: "))
                .unwrap_or("")
                .to_string();
            let ok = host == "app.example";
            seen.lock().unwrap().push(host);
            let _ = s.write_all(if ok {
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            } else {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            });
        }
    });
    let path = write_config(
        "health-host",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n[cache]\nsize = 0\n\
             [[pool]]\nname = \"named\"\nbackends = [{{ addr = \"{addr}\" }}]\n\
             health = {{ path = \"/hc\", host = \"app.example\", interval = \"100ms\", fall = 1 }}\n\
             [[pool]]\nname = \"plain\"\nbackends = [{{ addr = \"{addr}\" }}]\n\
             health = {{ path = \"/hc\", interval = \"100ms\", fall = 1 }}\n\
             [[route]]\npath_prefix = \"/plain\"\nto = \"plain\"\n"
        ),
    );
    let p = Proxy::start(&["-c", &path]);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) && hosts.lock().unwrap().len() < 4 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let hosts = hosts.lock().unwrap().clone();
    assert!(hosts.iter().any(|h| h == "app.example"), "{hosts:?}");
    assert!(hosts.iter().any(|h| *h == addr.to_string()), "{hosts:?}");
    assert!(
        hosts
            .iter()
            .all(|h| h == "app.example" || *h == addr.to_string()),
        "{hosts:?}"
    );
    // Only the pool that checks with the wrong Host took the backend down.
    assert!(wait_log(&p, "pool plain: backend", Duration::from_secs(5)).is_some());
    std::thread::sleep(Duration::from_millis(300));
    let log = p.stderr.lock().unwrap().clone();
    assert_eq!(log.matches("is DOWN").count(), 1, "{log}");
    assert!(log.contains("pool plain: backend"), "{log}");
}

#[test]
fn a_request_without_host_names_the_backend_it_was_retried_on() {
    // HTTP/1.0 without Host: corral adds the backend's address as Host. A
    // request retried after the dead backend refused, and a cache fill
    // (which picks its own backend), must name the backend that answers.
    let a = Backend::start("a");
    let dead = dead_addr();
    for cache in ["0", "\"1MiB\""] {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n[cache]\nsize = {cache}\n\
             [[pool]]\nname = \"app\"\nbackends = [{{ addr = \"{dead}\" }}, {{ addr = \"{}\" }}]\n",
            a.addr
        );
        let path = write_config("retry-host", &text);
        let p = Proxy::start(&["-c", &path]);
        for i in 0..6 {
            let out = raw_exchange(
                p.addr,
                format!("GET /cached/{i} HTTP/1.0\r\n\r\n").as_bytes(),
            );
            assert!(out.starts_with("HTTP/1.1 200"), "cache {cache}, {i}: {out}");
            assert!(
                out.contains(&format!("X-Host: {}\r\n", a.addr)),
                "cache {cache}, {i}: {out}"
            );
        }
    }
}

#[test]
fn a_post_that_reached_a_backend_is_not_retried() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    a.mode.store(DIE, Ordering::SeqCst);
    let path = config("no-retry", &[&a, &b], &[], "eject = { failures = 0 }\n");
    let p = Proxy::start(&["-c", &path, "--shards", "1"]);
    let mut codes = Vec::new();
    for _ in 0..6 {
        let mut c = Client::new(&p);
        codes.push(c.post("/p").status);
    }
    let failed = codes.iter().filter(|&&c| c == 502).count();
    assert_eq!(failed, a.received("POST"), "{codes:?}");
    assert!(failed >= 2, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 6 - failed);
    // An idempotent GET with no response byte back goes to the other.
    for _ in 0..6 {
        let mut c = Client::new(&p);
        let r = c.get("/g", "");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-backend"), Some("b"));
    }
    assert!(a.received("GET") >= 2);
}

#[test]
fn a_bodyless_post_on_a_reused_connection_is_not_repeated() {
    // The backend reads the POST and closes without answering, on a pooled
    // connection: that looks like a stale connection, but a non-idempotent
    // request that may have run must not be sent again (RFC 9112 §9.3.1.1).
    let a = Backend::start("a");
    let path = config("post-once", &[&a], &[], "eject = { failures = 0 }\n");
    let p = Proxy::start(&["-c", &path, "--shards", "1"]);
    let mut c = Client::new(&p);
    assert_eq!(c.get("/warm", "").status, 200);
    a.mode.store(DIE, Ordering::SeqCst);
    c.w.write_all(b"POST /charge HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let r = read_response(&mut c.r, false).unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(a.received("POST"), 1);
}

#[test]
fn a_restarted_backend_costs_no_failure() {
    // Five pooled connections, then the backend restarts (every one of them
    // closed): requests go on with 200s on fresh connections, nothing is
    // counted against the backend, and it is never ejected.
    let mut a = Backend::start("a");
    let path = config(
        "restart",
        &[&a],
        &[],
        "eject = { failures = 1, cooldown = \"30s\" }\n",
    );
    let p = Proxy::start(&["-c", &path, "--shards", "1"]);
    a.delay_ms.store(100, Ordering::SeqCst);
    let addr = p.addr;
    let warm: Vec<_> = (0..5)
        .map(|i| std::thread::spawn(move || get(addr, &format!("/w{i}")).status))
        .collect();
    for t in warm {
        assert_eq!(t.join().unwrap(), 200);
    }
    a.delay_ms.store(0, Ordering::SeqCst);
    a.kill();
    a.revive();
    std::thread::sleep(Duration::from_millis(50));
    for i in 0..10 {
        assert_eq!(get(p.addr, &format!("/r{i}")).status, 200, "request {i}");
    }
    assert!(
        !p.stderr.lock().unwrap().contains("ejected"),
        "{}",
        p.stderr.lock().unwrap()
    );
}

#[test]
fn a_backend_failing_every_body_is_ejected() {
    // Heads come, bodies break off: each response head used to count as a
    // success that cleared the failure before it, so the streak never
    // reached `failures` and every other request was cut. A success is a
    // body read to its end now.
    let (mut a, b) = (Backend::start("cut"), Backend::start("b"));
    a.mode.store(CUT, Ordering::SeqCst);
    let path = config(
        "cut-bodies",
        &[&a, &b],
        &[],
        "eject = { failures = 3, cooldown = \"30s\" }\n",
    );
    let p = Proxy::start(&["-c", &path]);
    let ejected = format!("backend {} ejected", a.addr);
    let mut cut = 0;
    for i in 0..40 {
        let text = raw_exchange(
            p.addr,
            format!("GET /c{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        if text.contains("0123456789") {
            cut += 1;
        } else {
            assert!(
                text.starts_with("HTTP/1.1 200") && text.ends_with("\r\nb"),
                "{text}"
            );
        }
        if p.stderr.lock().unwrap().contains(&ejected) {
            break;
        }
    }
    assert!(
        wait_log(&p, &ejected, Duration::from_secs(1)).is_some(),
        "{cut} responses cut, no ejection\n{}",
        p.stderr.lock().unwrap()
    );
    // At least `failures` of them; the owner reads the shards' reports
    // every 20 ms, so requests sent meanwhile still reach the backend (10
    // once on a busy machine).
    assert!(cut >= 3, "{cut} cut");
    a.kill();
}

#[test]
fn a_hung_backend_gives_bounded_504s_and_is_ejected() {
    let (mut a, b) = (Backend::start("hung"), Backend::start("b"));
    a.mode.store(HANG, Ordering::SeqCst);
    let path = config(
        "hung",
        &[&a, &b],
        &[],
        "response_timeout = \"300ms\"\neject = { failures = 2, cooldown = \"30s\" }\n",
    );
    let p = Proxy::start(&["-c", &path]);
    let mut slow = 0;
    let mut timeouts = 0;
    for i in 0..16 {
        let mut c = Client::new(&p);
        let t = Instant::now();
        let r = c.get(&format!("/h{i}"), "");
        let took = t.elapsed();
        assert!(took < Duration::from_secs(2), "request {i} took {took:?}");
        match r.status {
            504 => {
                timeouts += 1;
                assert!(took >= Duration::from_millis(250), "{took:?}");
            }
            200 => assert_eq!(r.header("x-backend"), Some("b")),
            s => panic!("status {s}"),
        }
        if took > Duration::from_millis(250) {
            slow += 1;
        }
    }
    assert!((1..=3).contains(&timeouts), "{timeouts} timeouts");
    assert_eq!(slow, timeouts);
    assert!(wait_log(
        &p,
        &format!("backend {} ejected", a.addr),
        Duration::from_secs(1)
    )
    .is_some());
    a.kill();
}

#[test]
fn sticky_sessions_stay_put_and_fail_over() {
    let (mut bs, p) = three(
        "sticky",
        ["a", "b", "c"],
        "balance = \"sticky\"\nsticky = { cookie = \"sid\" }\n",
    );
    let mut c = Client::new(&p);
    let first = c.get("/", "");
    let set = first
        .header("set-cookie")
        .expect("a session cookie")
        .to_string();
    assert!(set.starts_with("sid=") && set.contains("HttpOnly"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let home = first.header("x-backend").unwrap().to_string();
    for i in 0..12 {
        // New connections land on either shard: the cookie decides.
        let mut c = Client::new(&p);
        let r = c.get(&format!("/s{i}"), &format!("Cookie: a=1; {cookie}\r\n"));
        assert_eq!(r.header("x-backend"), Some(home.as_str()));
        assert!(r.header("set-cookie").is_none(), "no re-pin while it is up");
    }
    // A made-up value cannot name a backend: it gets a fresh pin.
    let r = Client::new(&p).get("/", "Cookie: sid=127.0.0.1:1\r\n");
    assert!(r.header("set-cookie").is_some());
    // Its backend dies: the session moves and is re-pinned.
    let i = bs.iter().position(|b| b.name == home).unwrap();
    bs[i].kill();
    let r = Client::new(&p).get("/", &format!("Cookie: {cookie}\r\n"));
    assert_eq!(r.status, 200);
    let moved = r.header("x-backend").unwrap().to_string();
    assert_ne!(moved, home);
    let set = r.header("set-cookie").expect("re-pinned").to_string();
    let cookie2 = set.split(';').next().unwrap().to_string();
    assert_ne!(cookie2, cookie);
    for _ in 0..6 {
        let r = Client::new(&p).get("/", &format!("Cookie: {cookie2}\r\n"));
        assert_eq!(r.header("x-backend"), Some(moved.as_str()));
    }
}

#[test]
fn hashing_sends_a_key_to_one_backend_from_every_shard() {
    let (_bs, p) = three(
        "hash",
        ["a", "b", "c"],
        // Without the load bound: a request still finishing on another
        // shard could otherwise spill the next one (the bound is checked
        // by the property tests).
        "balance = \"hash\"\nhash_key = \"header:X-User\"\nhash_balance_factor = 0\n",
    );
    let mut owners = HashMap::new();
    for user in 0..24 {
        for _ in 0..3 {
            let r = Client::new(&p).get("/", &format!("X-User: u{user}\r\n"));
            let b = r.header("x-backend").unwrap().to_string();
            let o = owners.entry(user).or_insert_with(|| b.clone());
            assert_eq!(*o, b, "user {user} moved");
        }
    }
    let used: std::collections::HashSet<_> = owners.values().collect();
    assert_eq!(used.len(), 3, "keys spread over every backend: {owners:?}");
}

#[test]
fn least_loaded_and_peak_ewma_avoid_a_slow_backend() {
    for algo in ["least-loaded", "peak-ewma"] {
        let (bs, p) = three(
            &format!("slow-{algo}"),
            ["a", "b", "slow"],
            &format!("balance = \"{algo}\"\n"),
        );
        bs[2].delay_ms.store(40, Ordering::SeqCst);
        let codes = load_for(&p, 6, Duration::from_millis(1500));
        assert!(codes.iter().all(|&c| c == 200));
        let (fast, slow) = (bs[0].served() + bs[1].served(), bs[2].served());
        // Round robin would give the slow one a third of all requests.
        assert!(
            (slow as f64) < (slow + fast) as f64 / 6.0,
            "{algo}: slow backend served {slow} of {}",
            slow + fast
        );
    }
}

#[test]
fn all_backends_down_gives_503_with_retry_after() {
    let path = write_config(
        "all-down",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[[pool]]\nname = \"app\"\n\
             backends = [{{ addr = \"{}\" }}, {{ addr = \"{}\" }}]\n\
             health = {{ path = \"/healthz\", interval = \"100ms\", fall = 1 }}\n",
            dead_addr(),
            dead_addr()
        ),
    );
    let p = Proxy::start(&["-c", &path]);
    assert!(wait_log(&p, "no backend is usable", Duration::from_secs(3)).is_some());
    for path in ["/", "/cacheable"] {
        let r = Client::new(&p).get(path, "");
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    let r = Client::new(&p).post("/");
    assert_eq!(r.status, 503);
}

#[test]
fn peak_ewma_reads_the_load_a_backend_reports() {
    let (bs, p) = three(
        "load-header",
        ["a", "b", "busy"],
        "balance = \"peak-ewma\"\nload_header = \"X-Load\"\n",
    );
    // All equally fast, but one says it is busy with 50 requests.
    *bs[2].extra.lock().unwrap() = "X-Load: 50\r\n".into();
    let codes = load_for(&p, 4, Duration::from_millis(1000));
    assert!(codes.iter().all(|&c| c == 200));
    let (busy, all) = (
        bs[2].served(),
        bs.iter().map(Backend::served).sum::<usize>(),
    );
    // Well under its fair third: a tenth in a quiet run, but on a busy
    // 2-core machine the others' latency peaks (which replace their
    // estimates at once) now and then make the busy one look cheaper, so
    // the bound is half the fair share (one failure in some dozens of
    // full runs at a tenth).
    assert!(
        (busy as f64) < all as f64 / 6.0,
        "the busy backend served {busy} of {all}"
    );
}

#[test]
fn a_load_report_counts_for_ewma_decay_only() {
    // A backend reports a spike once, then nothing: it loses every choice,
    // gets no request to report anything else on, and was shunned on that
    // one report for as long as its decaying estimate took to outweigh
    // it (tens of seconds). Now a report lapses after `ewma_decay`.
    let (a, b) = (Backend::start("a"), Backend::start("spike"));
    let path = config(
        "load-lapse",
        &[&a, &b],
        &[],
        "balance = \"peak-ewma\"\nload_header = \"X-Load\"\newma_decay = \"1s\"\n",
    );
    let p = Proxy::start(&["-c", &path]);
    *b.extra.lock().unwrap() = "X-Load: 300\r\n".into();
    let codes = load_for(&p, 2, Duration::from_millis(500));
    assert!(codes.iter().all(|&c| c == 200));
    b.extra.lock().unwrap().clear();
    std::thread::sleep(Duration::from_millis(1500));
    let before = (a.served(), b.served());
    let codes = load_for(&p, 2, Duration::from_millis(1000));
    assert!(codes.iter().all(|&c| c == 200));
    let (na, nb) = (a.served() - before.0, b.served() - before.1);
    assert!(
        nb as f64 > (na + nb) as f64 / 6.0,
        "the backend whose report lapsed served {nb} of {}",
        na + nb
    );
}

#[test]
fn with_every_backend_down_a_stale_response_answers_where_allowed() {
    let mut a = Backend::start("a");
    let path = write_config(
        "stale-down",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[[pool]]\nname = \"app\"\n\
             backends = [{{ addr = \"{}\" }}]\n\
             health = {{ path = \"/healthz\", interval = \"100ms\", fall = 1 }}\n",
            a.addr
        ),
    );
    let p = Proxy::start(&["-c", &path]);
    let r = Client::new(&p).get("/cached/x", "");
    assert_eq!(r.status, 200);
    a.kill();
    assert!(wait_log(&p, "no backend is usable", Duration::from_secs(3)).is_some());
    // Past its freshness: stale-if-error lets the stored answer stand in.
    std::thread::sleep(Duration::from_millis(1100));
    let r = Client::new(&p).get("/cached/x", "");
    assert_eq!(r.status, 200, "{}", p.stderr.lock().unwrap());
    assert_eq!(r.text(), "a");
    // Without a stored answer: 503.
    let r = Client::new(&p).get("/cached/never", "");
    assert_eq!(r.status, 503);
}

/// The shard a kept-alive connection lives on: the one whose request count
/// its next request raises.
fn shard_of(p: &Proxy, c: &mut Client) -> usize {
    let counts = || -> Vec<u64> {
        let r = get(p.admin_addr(), "/status");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["requests"].as_u64().unwrap())
            .collect()
    };
    let before = counts();
    assert_eq!(c.get("/which", "").status, 200);
    let after = counts();
    (0..before.len()).find(|&i| after[i] > before[i]).unwrap()
}

#[test]
fn failures_seen_on_one_shard_do_not_eject_a_backend_another_finds_working() {
    // One client gets 500s (with on_5xx, failures) on one shard while
    // clients on the other shard get good answers from the same backends
    // in between: no backend has `failures` consecutive failures, and none
    // is ejected. (Before, a shard reported successes only after failures
    // of its own, so the other shard's never reset the streak.)
    let (x, y) = (Origin::start(), Origin::start());
    let cfg = write_config(
        "cross-shard-streak",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\nadmin = \"127.0.0.1:0\"\n\
             [cache]\nsize = 0\n[[pool]]\nname = \"app\"\n\
             backends = [{{ addr = \"{}\" }}, {{ addr = \"{}\" }}]\n\
             eject = {{ failures = 3, on_5xx = true, cooldown = \"30s\" }}\n",
            x.addr, y.addr
        ),
    );
    let p = Proxy::start(&["-c", &cfg]);
    let mut failing = Client::new(&p);
    let s = shard_of(&p, &mut failing);
    let mut others = Vec::new();
    for _ in 0..64 {
        if others.len() == 2 {
            break;
        }
        let mut c = Client::new(&p);
        if shard_of(&p, &mut c) != s {
            others.push(c);
        }
    }
    assert_eq!(others.len(), 2, "no connection landed on the other shard");
    for round in 0..12 {
        assert_eq!(failing.get("/status/500", "").status, 500);
        // The owner publishes the streak at its next tick (20 ms).
        std::thread::sleep(Duration::from_millis(80));
        for c in &mut others {
            assert_eq!(c.get(&format!("/ok{round}"), "").status, 200);
        }
        std::thread::sleep(Duration::from_millis(80));
    }
    assert_eq!(
        metric_sum(p.admin_addr(), "corral_backend_ejections_total"),
        0.0,
        "{}",
        p.stderr.lock().unwrap()
    );
}
