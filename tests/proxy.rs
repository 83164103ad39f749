//! End-to-end tests of the pass-through proxy: real corral processes, real
//! origins, real sockets on loopback, all on port 0.

mod common;

use common::*;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn proxy_for(origin: &Origin, extra: &[&str]) -> Proxy {
    let b = origin.addr.to_string();
    let mut args = vec!["--backend", b.as_str()];
    if !extra.contains(&"--shards") {
        args.extend_from_slice(&["--shards", "2"]);
    }
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

/// A one-shard proxy for `origin` from a config file: `server_and_limits`
/// goes after `shards = 1` (more `[server]` keys, a `[limits]` table),
/// `pool_extra` into the pool `p`.
fn one_pool_proxy(name: &str, origin: &Origin, server_and_limits: &str, pool_extra: &str) -> Proxy {
    let cfg = write_config(
        name,
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n{server_and_limits}[[pool]]\nname = \"p\"\nbackends = [{{ addr = \"{}\" }}]\n{pool_extra}",
            origin.addr
        ),
    );
    Proxy::start(&["-c", &cfg])
}

#[test]
fn keep_alive_reuses_both_sides() {
    let origin = Origin::start();
    let p = proxy_for(&origin, &["--shards", "1"]);
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for i in 0..100 {
        write!(w, "GET /n/{i} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let resp = read_response(&mut r, false).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), format!("ok /n/{i}"));
        assert_eq!(resp.header("Via"), Some("1.1 corral"));
        assert!(resp.header("Connection").is_none());
    }
    assert_eq!(origin.requests(), 100);
    // The upstream connection was pooled and reused.
    assert_eq!(
        origin.connections.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[test]
fn pipelined_requests_answered_in_order() {
    let origin = Origin::start();
    let p = proxy_for(&origin, &[]);
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut all = Vec::new();
    for i in 0..20 {
        // Mixed sizes and framings, so that a reordering would show.
        let path = match i % 4 {
            0 => format!("/p/{i}"),
            1 => "/chunked/3000".to_string(),
            2 => "/delay/30".to_string(),
            _ => "/size/70000".to_string(),
        };
        all.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    }
    all.extend_from_slice(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc");
    all.extend_from_slice(b"GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    w.write_all(&all).unwrap();
    let mut r = BufReader::new(s);
    for i in 0..20 {
        let resp = read_response(&mut r, false).unwrap();
        assert_eq!(resp.status, 200);
        match i % 4 {
            0 => assert_eq!(resp.text(), format!("ok /p/{i}")),
            1 => assert_eq!(resp.body.len(), 3000),
            2 => assert_eq!(resp.text(), "late"),
            _ => assert_eq!(resp.body.len(), 70000),
        }
    }
    let echo = read_response(&mut r, false).unwrap();
    assert_eq!(
        echo.text(),
        format!("3 {}", b"abc".iter().map(|&b| b as u64).sum::<u64>())
    );
    let last = read_response(&mut r, false).unwrap();
    assert_eq!(last.text(), "ok /last");
    assert_eq!(last.header("Connection"), Some("close"));
}

#[test]
fn http10_with_and_without_keep_alive() {
    let origin = Origin::start();
    let p = proxy_for(&origin, &[]);
    // Without keep-alive: answered, then closed.
    let out = raw_exchange(p.addr, b"GET /a HTTP/1.0\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("Connection: close"));
    assert!(out.ends_with("ok /a"));
    // The origin got a Host even though the client sent none.
    assert_eq!(
        origin.last_seen().header("host"),
        Some(origin.addr.to_string().as_str())
    );
    // With keep-alive: the connection stays open.
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for _ in 0..3 {
        w.write_all(b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap();
        let resp = read_response(&mut r, false).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("Connection"), Some("keep-alive"));
    }
    // A chunked upstream body goes to an HTTP/1.0 client delimited by close.
    let out = raw_exchange(
        p.addr,
        b"GET /chunked/2500 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    );
    assert!(!out.contains("Transfer-Encoding"));
    assert!(out.contains("Connection: close"));
    assert_eq!(out.split("\r\n\r\n").nth(1).unwrap().len(), 2500);
}

#[test]
fn chunked_both_ways_and_close_delimited() {
    let origin = Origin::start();
    let p = proxy_for(&origin, &[]);
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    // Chunked request body, split over several writes.
    w.write_all(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    w.write_all(b"6;ext=1\r\n world\r\n0\r\nTrailer-X: 1\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut r, false).unwrap();
    let sum: u64 = b"hello world".iter().map(|&b| b as u64).sum();
    assert_eq!(resp.text(), format!("11 {sum}"));
    // 5000 one-byte chunks (batched into a few writes to the backend, not
    // one each), in two pieces of a chunk split mid-way.
    let mut body = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for i in 0..5000u32 {
        body.extend_from_slice(format!("1\r\n{}\r\n", (b'a' + (i % 26) as u8) as char).as_bytes());
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let (a, b) = body.split_at(body.len() / 2 + 1);
    w.write_all(a).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    w.write_all(b).unwrap();
    let resp = read_response(&mut r, false).unwrap();
    let sum: u64 = (0..5000u64).map(|i| b'a' as u64 + i % 26).sum();
    assert_eq!(resp.text(), format!("5000 {sum}"));
    // Chunked response body.
    w.write_all(b"GET /chunked/12345 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut r, false).unwrap();
    assert_eq!(resp.header("Transfer-Encoding"), Some("chunked"));
    assert_eq!(resp.body, vec![b'c'; 12345]);
    // A close-delimited response is re-framed as chunked; the client
    // connection survives.
    w.write_all(b"GET /close/5000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut r, false).unwrap();
    assert_eq!(resp.header("Transfer-Encoding"), Some("chunked"));
    assert_eq!(resp.body, vec![b'z'; 5000]);
    w.write_all(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut r, false).unwrap().text(), "ok /again");
}

#[test]
fn head_204_304_have_no_body() {
    let origin = Origin::start();
    let p = proxy_for(&origin, &[]);
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(b"HEAD /size/100 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut r, true).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("Content-Length"), Some("100"));
    for code in [204, 304] {
        write!(w, "GET /status/{code} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let resp = read_response(&mut r, false).unwrap();
        assert_eq!(resp.status, code);
        assert!(resp.body.is_empty());
    }
    // The connection is still in sync.
    w.write_all(b"GET /sync HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut r, false).unwrap().text(), "ok /sync");
}

#[test]
fn forwarding_headers_and_hop_by_hop() {
    let origin = Origin::start();
    let p = proxy_for(&origin, &[]);
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(
        b"GET /h HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: websocket\r\nProxy-Connection: keep-alive\r\nX-Forwarded-For: 192.0.2.1\r\nVia: 1.0 edge\r\nX-Keep: me\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_response(&mut r, false).unwrap().status, 200);
    let seen = origin.last_seen();
    for gone in [
        "Connection",
        "X-Private",
        "Keep-Alive",
        "TE",
        "Upgrade",
        "Proxy-Connection",
    ] {
        assert!(seen.header(gone).is_none(), "{gone} was forwarded");
    }
    assert_eq!(seen.header("X-Forwarded-For"), Some("192.0.2.1, 127.0.0.1"));
    assert_eq!(seen.header("X-Forwarded-Proto"), Some("http"));
    assert_eq!(seen.header("Via"), Some("1.0 edge, 1.1 corral"));
    assert_eq!(seen.header("X-Keep"), Some("me"));
    assert_eq!(seen.header("Host"), Some("t"));
}

#[test]
fn expect_100_continue() {
    let origin = Origin::start();
    let p = proxy_for(&origin, &[]);
    let mut s = p.connect();
    s.write_all(
        b"PUT /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
    )
    .unwrap();
    // corral's own interim answer carries its Via, as every response does.
    let mut buf = [0u8; 42];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\nVia: 1.1 corral\r\n\r\n");
    s.write_all(b"data").unwrap();
    let resp = read_response(&mut BufReader::new(s), false).unwrap();
    let sum: u64 = b"data".iter().map(|&b| b as u64).sum();
    assert_eq!(resp.text(), format!("4 {sum}"));
    assert!(origin.last_seen().header("Expect").is_none());
}

#[test]
fn large_bodies_stream_with_bounded_memory() {
    const SIZE: u64 = 200 << 20;
    let origin = Origin::start();
    let p = proxy_for(&origin, &["--shards", "1"]);
    let base = p.rss_bytes();
    let mut s = p.connect();
    write!(
        s,
        "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {SIZE}\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut max_rss = 0;
    for i in 0..(SIZE >> 20) {
        s.write_all(&chunk).unwrap();
        if i % 16 == 0 {
            max_rss = max_rss.max(p.rss_bytes());
        }
    }
    let mut r = BufReader::new(s.try_clone().unwrap());
    let resp = read_response(&mut r, false).unwrap();
    assert_eq!(resp.text(), format!("{SIZE} {}", SIZE * 7));
    // And 200 MiB back down.
    write!(s, "GET /size/{SIZE} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"));
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    let mut got: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while got < SIZE {
        let n = r.read(&mut buf).unwrap();
        assert!(n > 0, "body ended early at {got}");
        got += n as u64;
        if got % (16 << 20) < n as u64 {
            max_rss = max_rss.max(p.rss_bytes());
        }
    }
    assert_eq!(got, SIZE);
    let growth = max_rss.saturating_sub(base);
    assert!(
        growth < 32 << 20,
        "RSS grew by {} MiB while streaming 200 MiB",
        growth >> 20
    );
}

/// Sockets in CLOSE_WAIT whose remote end is `port` (this network
/// namespace's, from /proc/net/tcp): the proxy's side of connections the
/// origin on `port` closed.
fn close_wait_to(port: u16) -> usize {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    tcp.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "08"
                && f[2]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count()
}

#[test]
fn pooled_connections_the_backend_closed_are_let_go() {
    // The origin closes each connection 20 ms after its answer: the
    // pooled socket is dropped at the next sweep (about a second), not
    // held in CLOSE_WAIT for keepalive_timeout (30 s).
    let origin = Origin::start();
    let port = origin.addr.port();
    let p = proxy_for(&origin, &["--shards", "1"]);
    for _ in 0..3 {
        assert_eq!(get(p.addr, "/oneshot").text(), "once");
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    while close_wait_to(port) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{} sockets still in CLOSE_WAIT",
            close_wait_to(port)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get(p.addr, "/x").text(), "ok /x");
}

#[test]
fn a_full_pool_keeps_its_newest_connection() {
    // keepalive = 1: two exchanges end 1.4 s apart and only one connection
    // may stay. The older one is let go (as nginx's keepalive does), so the
    // one kept is still within its 2 s idle time when the next request
    // comes 2.3 s after the first ended; keeping the first instead would
    // make that request open a third connection.
    let origin = Origin::start();
    let p = one_pool_proxy(
        "pool-lru",
        &origin,
        "",
        "keepalive = 1\nkeepalive_timeout = \"2s\"\n",
    );
    let addr = p.addr;
    let slow = std::thread::spawn(move || get(addr, "/delay/1500").status);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(get(p.addr, "/delay/100").status, 200);
    let first_done = Instant::now();
    assert_eq!(slow.join().unwrap(), 200);
    let conns = || origin.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(conns(), 2);
    std::thread::sleep(Duration::from_millis(2300).saturating_sub(first_done.elapsed()));
    assert_eq!(get(p.addr, "/x").text(), "ok /x");
    assert_eq!(
        conns(),
        2,
        "the newest idle connection was not the one kept"
    );
}

#[test]
fn a_client_gone_before_the_answer_leaves_the_backend_connection_pooled() {
    // The client resets its connection while the origin takes 300 ms: the
    // origin's whole answer is read, the write to the client fails, and
    // the backend connection, clean, serves the next client.
    let origin = Origin::start();
    let p = one_pool_proxy("gone-client", &origin, "", "");
    let mut s = p.connect();
    // A POST: a GET would be a cache fill, which runs to its end anyway.
    s.write_all(b"POST /delay/300 HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let off = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_socket_option(&s, libc::SO_LINGER, &off);
    drop(s);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(origin.requests(), 1);
    assert_eq!(get(p.addr, "/x").text(), "ok /x");
    assert_eq!(
        origin.connections.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[test]
fn backend_down_is_502() {
    // A port with nothing listening: bind, note the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let d = dead.to_string();
    let p = Proxy::start(&["--backend", &d]);
    let resp = get(p.addr, "/x");
    assert_eq!(resp.status, 502);
    assert_eq!(resp.header("Via"), Some("1.1 corral"));
    // The client connection survives a 502 when the request had no body.
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for _ in 0..2 {
        w.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut r, false).unwrap().status, 502);
    }
}

#[test]
fn backend_timeout_is_504_and_hang_is_bounded() {
    let origin = Origin::start();
    let p = one_pool_proxy("timeout", &origin, "", "response_timeout = \"300ms\"\n");
    let t = Instant::now();
    let resp = get(p.addr, "/hang");
    assert_eq!(resp.status, 504);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(get(p.addr, "/delay/1").status, 200);
}

#[test]
fn backend_dying_mid_body_cuts_the_client() {
    let origin = Origin::start();
    let p = proxy_for(&origin, &[]);
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    w.write_all(b"GET /die/100000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut r, false).unwrap();
    assert_eq!(resp.status, 200);
    assert!(resp.truncated, "a short body must not look complete");
    assert_eq!(resp.body.len(), 100000);
    // The connection is closed, not left for another request.
    let mut s = s;
    assert!(closed_within(&mut s, Duration::from_secs(5)));
}

#[test]
fn stale_pooled_connection_is_retried() {
    let origin = Origin::start();
    let p = proxy_for(&origin, &["--shards", "1"]);
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for _ in 0..5 {
        // The origin closes after each answer without saying so; the pooled
        // connection is dead when the next request comes.
        w.write_all(b"GET /oneshot HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let resp = read_response(&mut r, false).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "once");
        std::thread::sleep(Duration::from_millis(60));
    }
}

#[test]
fn malformed_requests_get_4xx_and_close() {
    let origin = Origin::start();
    let p = proxy_for(&origin, &[]);
    let cases: &[(&[u8], &str)] = &[
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", "400"),
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: snappy, chunked\r\n\r\n", "501"),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n folded\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost : t\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX: a\rb\r\n\r\n", "400"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "400"),
        (b"GET / HTTP/1.1\r\n\r\n", "400"),
        // Hosts that one reader would route by one name and another read as
        // a different one: userinfo, a path, a space, an empty authority.
        (b"GET http://public.example:1@admin.internal/ HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a.example:80@evil\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a.example/x\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a.example:8o\r\n\r\n", "400"),
        (b"GET http://:80/x HTTP/1.1\r\nHost: t\r\n\r\n", "400"),
        (b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", "505 HTTP Version Not Supported"),
        (b"GET / HTTP/1.10\r\nHost: t\r\n\r\n", "400"),
    ];
    for (req, code) in cases {
        let out = raw_exchange(p.addr, req);
        assert!(
            out.starts_with(&format!("HTTP/1.1 {code}")),
            "{:?} gave {out:?}",
            String::from_utf8_lossy(req)
        );
        assert!(out.contains("Connection: close"));
    }
    // Nothing malformed reached the origin, and the proxy still serves.
    assert_eq!(origin.requests(), 0);
    assert_eq!(get(p.addr, "/fine").status, 200);
    // A later 1.x minor version is served as HTTP/1.1 (RFC 9112 §2.3).
    let out = raw_exchange(
        p.addr,
        b"GET /v HTTP/1.2\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out:?}");
    assert!(out.ends_with("ok /v"), "{out:?}");
}

#[test]
fn limits_414_431_413() {
    let origin = Origin::start();
    let p = one_pool_proxy("limits", &origin, "[limits]\nmax_header_bytes = \"4KiB\"\nmax_uri_bytes = 1024\nmax_headers = 20\nmax_body_bytes = 1000\n", "");
    let uri = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "u".repeat(2000));
    assert!(raw_exchange(p.addr, uri.as_bytes()).starts_with("HTTP/1.1 414"));
    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX: {}\r\n\r\n",
        "h".repeat(5000)
    );
    assert!(raw_exchange(p.addr, big.as_bytes()).starts_with("HTTP/1.1 431"));
    let mut many = String::from("GET / HTTP/1.1\r\nHost: t\r\n");
    for i in 0..30 {
        many.push_str(&format!("X-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert!(raw_exchange(p.addr, many.as_bytes()).starts_with("HTTP/1.1 431"));
    let body = "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n";
    assert!(raw_exchange(p.addr, body.as_bytes()).starts_with("HTTP/1.1 413"));
    // A chunked body that grows past the limit is cut off with 413.
    let mut s = p.connect();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    for _ in 0..3 {
        let _ = s.write_all(b"200\r\n");
        let _ = s.write_all(&[b'x'; 512]);
        let _ = s.write_all(b"\r\n");
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert_eq!(origin.requests(), 0);
}

#[test]
fn heads_trickled_in_small_pieces_get_the_same_answers() {
    // A head arriving a few bytes at a time is parsed again only when a
    // line ends, the buffer doubles or a limit is crossed (not at every
    // read from its first byte): the answers are those of a head sent
    // whole, and a bad request line is still refused as soon as it ends.
    let origin = Origin::start();
    let p = one_pool_proxy(
        "trickle",
        &origin,
        "[limits]\nmax_header_bytes = \"4KiB\"\nmax_uri_bytes = 1024\nheader_timeout = \"20s\"\n",
        "",
    );
    let trickle = |bytes: &[u8]| -> (String, Duration) {
        let mut s = p.connect();
        s.set_nodelay(true).unwrap();
        let t = Instant::now();
        for piece in bytes.chunks(3) {
            if s.write_all(piece).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        (got, t.elapsed())
    };
    let headers: String = (0..30)
        .map(|i| format!("X-Field-{i}: {}\r\n", "v".repeat(i * 3)))
        .collect();
    let ok = format!("GET /echo HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n");
    let (got, _) = trickle(ok.as_bytes());
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    let seen = origin.seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("X-Field-29"), Some("v".repeat(87).as_str()));
    drop(seen);
    let (got, took) = trickle(format!("G@T / HTTP/1.1\r\nHost: t\r\n{headers}").as_bytes());
    assert!(got.starts_with("HTTP/1.1 400"), "{got:?}");
    assert!(took < Duration::from_secs(10));
    let long_uri = format!("GET /{} HTTP/1.1\r\n", "u".repeat(2000));
    let (got, _) = trickle(long_uri.as_bytes());
    assert!(got.starts_with("HTTP/1.1 414"), "{got:?}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX: {}\r\n\r\n",
        "h".repeat(5000)
    );
    let (got, _) = trickle(big.as_bytes());
    assert!(got.starts_with("HTTP/1.1 431"), "{got:?}");
}

#[test]
fn urgent_data_inside_a_request_does_not_stall_it() {
    // A head with a TCP urgent byte in the middle, all in one segment:
    // `recv` stops short at the urgent mark with the rest already queued
    // (no further edge will come for it), so a short read must not be
    // taken for "nothing more" there. Without that the request waits for
    // its 408.
    use std::os::unix::io::AsRawFd;
    let origin = Origin::start();
    let p = one_pool_proxy("urgent", &origin, "[limits]\nheader_timeout = \"3s\"\n", "");
    let mut s = p.connect();
    let fd = s.as_raw_fd();
    let cork = |on: libc::c_int| {
        // SAFETY: a valid socket and option value.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_CORK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
    };
    cork(1);
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").unwrap();
    // SAFETY: a valid socket and a one-byte buffer.
    let sent = unsafe { libc::send(fd, b"!".as_ptr().cast(), 1, libc::MSG_OOB) };
    assert_eq!(sent, 1);
    s.write_all(b"Connection: close\r\n\r\n").unwrap();
    cork(0);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
}

#[test]
fn slowloris_gets_408_and_idle_connections_close() {
    let origin = Origin::start();
    let p = one_pool_proxy(
        "slow",
        &origin,
        "[limits]\nheader_timeout = \"400ms\"\nidle_timeout = \"600ms\"\n",
        "",
    );
    // A head trickled byte by byte never completes in time.
    let mut s = p.connect();
    let t = Instant::now();
    let mut got = String::new();
    for b in b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: "
        .iter()
        .cycle()
        .take(200)
    {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        if t.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let _ = s.read_to_string(&mut got);
    assert!(got.starts_with("HTTP/1.1 408"), "{got:?}");
    assert!(t.elapsed() < Duration::from_secs(3));
    // An idle keep-alive connection is closed after idle_timeout.
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    w.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut r, false).unwrap().status, 200);
    let t = Instant::now();
    let mut s = s;
    assert!(closed_within(&mut s, Duration::from_secs(5)));
    assert!(t.elapsed() >= Duration::from_millis(400));
}

#[test]
fn a_short_deadline_fires_while_a_long_one_waits() {
    // Deadlines live in the shard's poller, which parks with one timer for
    // the earliest. An idle connection sets it 60 s away; a head that stops
    // coming must still get its 408 after header_timeout, not after 60 s.
    let origin = Origin::start();
    let p = one_pool_proxy(
        "deadlines",
        &origin,
        "[limits]\nheader_timeout = \"300ms\"\nidle_timeout = \"60s\"\n",
        "",
    );
    let _idle = p.connect();
    std::thread::sleep(Duration::from_millis(200));
    let mut s = p.connect();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").unwrap();
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    assert!(got.starts_with("HTTP/1.1 408"), "{got:?}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "408 after {took:?}"
    );
}

#[test]
fn connection_cap_refuses_cleanly() {
    let origin = Origin::start();
    let p = one_pool_proxy(
        "cap",
        &origin,
        "max_connections = 2\nadmin = \"127.0.0.1:0\"\n",
        "",
    );
    let mut held = Vec::new();
    for _ in 0..2 {
        let s = p.connect();
        let mut w = s.try_clone().unwrap();
        w.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        assert_eq!(read_response(&mut r, false).unwrap().status, 200);
        held.push(s);
    }
    let out = raw_exchange(p.addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains("Retry-After"));
    // Counted apart from the requests (none was read).
    let metrics = raw_exchange(
        p.admin_addr(),
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(
        metrics.contains("\ncorral_connections_refused_total 1\n"),
        "{metrics}"
    );
    assert!(!metrics.contains("corral_requests_total{code=\"503\"}"));
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(get(p.addr, "/").status, 200);
}

#[test]
fn a_refused_connection_still_gets_its_503_while_sending_a_body() {
    // Over the cap, with a 256 KiB body still coming: closing at once with
    // unread bytes would be a reset that destroys the 503; it lingers.
    let origin = Origin::start();
    let p = one_pool_proxy("cap-linger", &origin, "max_connections = 1\n", "");
    let held = p.connect();
    let mut w = held.try_clone().unwrap();
    w.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut r = BufReader::new(held.try_clone().unwrap());
    assert_eq!(read_response(&mut r, false).unwrap().status, 200);
    for _ in 0..5 {
        // A client that sends its whole request before it reads (as most
        // do), with pauses so that the refusal comes mid-body.
        let mut s = p.connect();
        let _ = s.write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 262144\r\n\r\n");
        for i in 0..64 {
            if s.write_all(&[b'x'; 4096]).is_err() {
                break;
            }
            if i % 16 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let resp = read_response(&mut BufReader::new(s), false);
        assert_eq!(resp.map(|r| r.status).map_err(|e| e.kind()), Ok(503));
    }
    drop(held);
}

#[test]
fn graceful_shutdown_finishes_in_flight_requests() {
    let origin = Origin::start();
    let mut p = proxy_for(&origin, &[]);
    // An idle keep-alive connection, and one with a request in flight.
    let mut idle = p.connect();
    let busy = p.connect();
    let mut w = busy.try_clone().unwrap();
    w.write_all(b"GET /delay/700 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    p.signal(libc::SIGTERM);
    // The idle connection is closed promptly.
    assert!(closed_within(&mut idle, Duration::from_secs(2)));
    // The in-flight request completes, and is told the connection closes.
    let resp = read_response(&mut BufReader::new(busy), false).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "late");
    assert_eq!(resp.header("Connection"), Some("close"));
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));
    // Nobody listens any more.
    assert!(TcpStream::connect(p.addr).is_err());
}

#[test]
fn a_request_sent_during_shutdown_does_not_reset_the_answer_before_it() {
    // The stop comes while a request is at the origin, and the client
    // pipelines another meanwhile: the first is answered with `Connection:
    // close` and the connection then ends with a FIN. Closing with the
    // second request unread in the socket sent a reset instead, which
    // can destroy the answer on its way (the client saw ECONNRESET).
    let origin = Origin::start();
    let mut p = proxy_for(&origin, &["--shards", "1"]);
    let s = p.connect();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(b"GET /delay/600 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    p.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(150));
    w.write_all(b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s);
    let first = read_response(&mut r, false).unwrap();
    assert_eq!((first.status, first.text().as_str()), (200, "late"));
    assert_eq!(first.header("Connection"), Some("close"));
    let mut rest = Vec::new();
    let end = r.read_to_end(&mut rest);
    assert!(
        matches!(end, Ok(0)),
        "the connection ends with a FIN after the answer: {end:?}"
    );
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn empty_lines_between_requests_are_ignored() {
    // RFC 9112 §2.2: a CRLF after a request (some clients end a body with
    // one) is not the start of a head: no header_timeout, no 408.
    let origin = Origin::start();
    let p = one_pool_proxy(
        "blank-lines",
        &origin,
        "[limits]\nheader_timeout = \"300ms\"\n",
        "",
    );
    let s = p.connect();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut r, false).unwrap().text(), "ok /a");
    std::thread::sleep(Duration::from_millis(800));
    w.write_all(b"\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let b = read_response(&mut r, false).unwrap();
    assert_eq!((b.status, b.text().as_str()), (200, "ok /b"));
}

#[test]
fn a_connection_that_sends_nothing_is_closed_after_header_timeout() {
    // Its first byte is awaited for header_timeout, not idle_timeout (as
    // nginx's client_header_timeout, HAProxy's timeout http-request):
    // empty connections cannot hold places for a minute. Silently, as
    // nginx does; once a request was answered, idle_timeout applies.
    let origin = Origin::start();
    let p = one_pool_proxy(
        "first-byte",
        &origin,
        "[limits]\nheader_timeout = \"300ms\"\nidle_timeout = \"20s\"\n",
        "",
    );
    let mut silent = p.connect();
    let t = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(5)));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let mut used = p.connect();
    used.write_all(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(used.try_clone().unwrap());
    assert_eq!(read_response(&mut r, false).unwrap().status, 200);
    // Past header_timeout, the kept-alive connection is still open.
    std::thread::sleep(Duration::from_millis(800));
    used.write_all(b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut r, false).unwrap().text(), "ok /b");
}

#[test]
fn an_idle_proxy_stops_on_sigint_and_sigterm() {
    // Every shard parked with nothing to do: the housekeeping timer sees the
    // flag, and the nudger's bytes wake the shards should that timer's own
    // wake-up be missed.
    let origin = Origin::start();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut p = proxy_for(&origin, &["--shards", "2"]);
        assert_eq!(get(p.addr, "/").status, 200);
        std::thread::sleep(Duration::from_millis(300));
        p.signal(sig);
        assert_eq!(
            p.wait_exit(Duration::from_secs(10)),
            Some(0),
            "signal {sig}"
        );
        assert!(TcpStream::connect(p.addr).is_err());
    }
}

#[test]
fn a_restart_on_the_same_port_gets_every_connection() {
    // A stopped corral must leave nothing listening: its rings are torn
    // down after the process exits, and a listener they still held kept
    // taking connections, sharing the port (SO_REUSEPORT) with the next
    // corral, so some clients of the new one hung.
    let origin = Origin::start();
    let b = origin.addr.to_string();
    for round in 0..3 {
        let mut first = Proxy::start(&["--backend", &b, "--shards", "2"]);
        let port = first.addr.to_string();
        assert_eq!(get(first.addr, "/").status, 200);
        first.signal(libc::SIGTERM);
        assert_eq!(first.wait_exit(Duration::from_secs(10)), Some(0));
        let second = Proxy::start(&["--listen", &port, "--backend", &b, "--shards", "2"]);
        for i in 0..40 {
            let mut s = TcpStream::connect(second.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .unwrap();
            let resp = read_response(&mut BufReader::new(s), false);
            assert!(
                resp.is_ok_and(|r| r.status == 200),
                "round {round}, connection {i} to the restarted corral"
            );
        }
    }
}

#[test]
fn startup_errors_exit_2() {
    // Address in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = taken.local_addr().unwrap().to_string();
    let err = Proxy::try_start(&["--listen", &a, "--backend", "127.0.0.1:9"])
        .err()
        .unwrap();
    assert_eq!(err.0, 2);
    assert!(err.1.contains("already in use"), "{}", err.1);
    // No origin.
    let err = Proxy::try_start(&[]).err().unwrap();
    assert_eq!(err.0, 2);
    // A bad config names its key.
    let cfg = write_config("bad", "[server]\nlisten = [\"127.0.0.1:0\"]\nshrads = 2\n");
    let err = Proxy::try_start(&["-c", &cfg]).err().unwrap();
    assert_eq!(err.0, 2);
    assert!(err.1.contains("shrads"), "{}", err.1);
}

#[test]
fn a_cpu_outside_the_affinity_mask_is_a_clear_start_error() {
    // Run on CPU 0 only (as `taskset -c 0` or a container's cpuset would),
    // corral asked to pin a shard to CPU 1 says so and exits 2.
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("one CPU here: nothing to check");
        return;
    }
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_corral"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "127.0.0.1:9",
        "--shards",
        "1",
        "--cpus",
        "1",
    ]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("CPU 1 is not one this process may run on"),
        "{err}"
    );
}

#[test]
fn a_low_open_file_limit_is_raised_at_start() {
    // Started with a soft limit of 256 descriptors, corral raises it and
    // holds 300 client connections, each with its own upstream connection.
    let origin = Origin::start();
    let cmd = format!(
        "ulimit -Sn 256 && exec {} --listen 127.0.0.1:0 --backend {} --shards 1",
        env!("CARGO_BIN_EXE_corral"),
        origin.addr
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", &cmd])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let addr: std::net::SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("listening line");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(soft > 256, "{limits}");
    let mut conns = Vec::new();
    for i in 0..300 {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        (&s).write_all(format!("GET /n{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .unwrap();
        let resp = read_response(&mut r, false).unwrap();
        assert_eq!(resp.status, 200, "connection {i}");
        conns.push((s, r));
    }
    // Every connection is still usable.
    for (i, (s, r)) in conns.iter_mut().enumerate() {
        s.write_all(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(r, false).unwrap().status, 200, "again {i}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_readme_config_file_is_valid() {
    // The README's "complete config file, every key with its default", as
    // written, but for the store's root (a folder that must exist) and, on
    // a machine with one CPU, its `cpus` (CPUs are checked against the
    // machine).
    let readme = include_str!("../README.md");
    let from = readme
        .find("A complete config file, every key with its default")
        .expect("the README's config section");
    let start = readme[from..].find("```toml\n").unwrap() + from + "```toml\n".len();
    let end = readme[start..].find("```").unwrap() + start;
    let root = std::env::temp_dir().join(format!("corral-test-{}-readme", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let mut text = readme[start..end].replace("/srv/files", &root.to_string_lossy());
    if !std::path::Path::new("/sys/devices/system/cpu/cpu1").exists() {
        text = text.replace("cpus = \"0-1\"", "cpus = \"0\"");
    }
    check_config_passes(&write_config("readme", &text));
}

/// `corral check-config FILE`: its exit code and standard error.
fn check_config(file: &str) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["check-config", file])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn check_config_passes(file: &str) {
    let (code, err) = check_config(file);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn check_config_reports_every_error() {
    let cfg = write_config(
        "check",
        "[server]\nlisten = [\"127.0.0.1:0\"]\nbogus = 1\n[limits]\nidle_timeout = \"forever\"\n[[pool]]\nname = \"a\"\nbackends = [{ addr = \"127.0.0.1:1\", weight = 0 }]\n[[route]]\nto = \"b\"\n",
    );
    let (code, err) = check_config(&cfg);
    assert_eq!(code, Some(2));
    for key in [
        "server.bogus",
        "limits.idle_timeout",
        "pool[0].backends[0].weight",
        "route[0].to",
    ] {
        assert!(err.contains(key), "{key} missing from {err}");
    }
    let good = write_config(
        "good",
        "[[pool]]\nname = \"a\"\nbackends = [{ addr = \"127.0.0.1:1\" }]\n",
    );
    check_config_passes(&good);
}

#[test]
fn routes_pick_pools_by_host_and_prefix() {
    let a = Origin::start();
    let b = Origin::start();
    let cfg = write_config(
        "routes",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n[[pool]]\nname = \"a\"\nbackends = [{{ addr = \"{}\" }}]\n[[pool]]\nname = \"b\"\nbackends = [{{ addr = \"{}\" }}]\n[[route]]\npath_prefix = \"/api/\"\nto = \"b\"\n[[route]]\nhost = \"B.example\"\nto = \"b\"\n",
            a.addr, b.addr
        ),
    );
    let p = Proxy::start(&["-c", &cfg]);
    let req = |host: &str, path: &str| {
        let out = raw_exchange(
            p.addr,
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    };
    req("a.example", "/x");
    assert_eq!((a.requests(), b.requests()), (1, 0));
    req("a.example", "/api/v1");
    assert_eq!((a.requests(), b.requests()), (1, 1));
    req("b.example:8080", "/x");
    assert_eq!((a.requests(), b.requests()), (1, 2));
    // A fully qualified name with its trailing dot is the same host (and
    // goes upstream as the client wrote it).
    req("b.example.", "/x");
    assert_eq!((a.requests(), b.requests()), (1, 3));
    assert_eq!(b.last_seen().header("Host"), Some("b.example."));
    // Spellings of /api/ that a backend (or a store) reads as /api/ take
    // its route too, and go upstream as the client wrote them.
    for path in ["/%61pi/v2", "//api/v3", "/x/../api/v4", "/./api/v5"] {
        req("a.example", path);
        assert_eq!(b.last_seen().path, path);
    }
    assert_eq!((a.requests(), b.requests()), (1, 7));
}

#[test]
fn weighted_round_robin_spreads_requests() {
    let a = Origin::start();
    let b = Origin::start();
    let (sa, sb) = (format!("{},weight=3", a.addr), b.addr.to_string());
    let p = Proxy::start(&["--backend", &sa, "--backend", &sb, "--shards", "1"]);
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for _ in 0..40 {
        w.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut r, false).unwrap().status, 200);
    }
    assert_eq!((a.requests(), b.requests()), (30, 10));
}

#[test]
fn connection_churn_leaves_no_memory_behind() {
    // Each connection waits idle once (registering for the drain signal)
    // and closes; 20k of them must not grow the process (a leaked waker per
    // connection grew it by 2 MiB here).
    let origin = Origin::start();
    let p = proxy_for(&origin, &["--shards", "1", "--cache-size", "0"]);
    let churn = |n: usize| {
        for _ in 0..n {
            let mut s = p.connect();
            s.write_all(b"GET /size/10 HTTP/1.1\r\nHost: t\r\n\r\n")
                .unwrap();
            let r = read_response(&mut BufReader::new(&mut s), false).unwrap();
            assert_eq!(r.status, 200);
        }
    };
    churn(3000);
    let before = p.rss_bytes();
    churn(20_000);
    let grown = p.rss_bytes().saturating_sub(before);
    assert!(
        grown < 1 << 20,
        "RSS grew {grown} bytes over 20k connections"
    );
}

/// Sends `head` and then `body_len` bytes of body from another thread
/// (ignoring write errors: the server may stop reading), and reads the
/// response with `read_to_end`.
fn post_while_reading(addr: std::net::SocketAddr, head: String, body_len: usize) -> String {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(head.as_bytes());
        let chunk = vec![b'x'; 16 * 1024];
        let mut left = body_len;
        while left > 0 {
            let n = left.min(chunk.len());
            if w.write_all(&chunk[..n]).is_err() {
                return;
            }
            left -= n;
        }
    });
    let mut out = Vec::new();
    let mut r = s;
    let _ = r.read_to_end(&mut out);
    let _ = writer.join();
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn an_error_answered_before_the_body_is_read_is_not_lost_to_a_reset() {
    // 413 for a declared body too large while the client goes on sending
    // it: corral reads and drops what comes (lingering close), so the
    // kernel does not reset the connection under the 413.
    let origin = Origin::start();
    let p = one_pool_proxy("linger", &origin, "[limits]\nmax_body_bytes = 1000\n", "");
    for _ in 0..5 {
        let out = post_while_reading(
            p.addr,
            "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 400000\r\n\r\n".into(),
            400_000,
        );
        assert!(out.starts_with("HTTP/1.1 413"), "{out:?}");
    }
}

/// A backend that reads each connection's request head (never its body)
/// and then runs `answer` on the connection.
fn head_only_backend(
    answer: impl Fn(&mut TcpStream) + Send + Sync + 'static,
) -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) == 0
                    || line == "\r\n"
                {
                    break;
                }
            }
            answer(&mut s);
        }
    });
    backend
}

#[test]
fn a_backend_answering_before_taking_the_body_is_heard() {
    // The backend reads the head, answers 413 and closes without reading
    // the body: the client gets that 413, not a 502. Also when the backend
    // says 100 Continue anyway before its 413.
    for interim in ["", "HTTP/1.1 100 Continue\r\n\r\n"] {
        let backend = head_only_backend(move |s| {
            let _ = s.write_all(format!(
                "{interim}HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n"
            ).as_bytes());
            std::thread::sleep(Duration::from_millis(50));
        });
        let b = backend.to_string();
        let p = Proxy::start(&["--backend", &b, "--shards", "1"]);
        let out = post_while_reading(
            p.addr,
            "POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 8000000\r\n\r\n".into(),
            8_000_000,
        );
        assert!(out.starts_with("HTTP/1.1 413"), "{out:?}");
        assert!(out.ends_with("too big\n"), "{out:?}");
    }
}

#[test]
fn an_http10_client_sees_a_backend_dying_mid_body_as_a_reset() {
    // The client's body is close-delimited (HTTP/1.0, chunked from the
    // backend): a FIN would look like the end of a complete response, so
    // a backend dying mid-body ends the client connection with a reset.
    let backend = head_only_backend(|s| {
        let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n".to_vec();
        out.extend_from_slice(&[b'x'; 4096]);
        out.extend_from_slice(b"\r\n");
        let _ = s.write_all(&out);
        std::thread::sleep(Duration::from_millis(50));
    });
    let b = backend.to_string();
    // Passed through (cache off), and through a cache fill.
    for cache in ["0", "64MiB"] {
        let p = Proxy::start(&["--backend", &b, "--shards", "1", "--cache-size", cache]);
        let mut s = p.connect();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /cut HTTP/1.0\r\n\r\n").unwrap();
        let mut out = Vec::new();
        let r = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            r.is_err(),
            "cache {cache}: a cut close-delimited body ended with a clean FIN ({} bytes)",
            out.len()
        );
    }
}

#[test]
fn a_slowly_produced_response_streams_as_it_comes() {
    // Server-sent events through the plain proxy (a POST: never cached):
    // the head and the first event must reach the client while the backend
    // still holds the rest back, not once 16 KiB have piled up.
    let backend = head_only_backend(|s| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nc\r\ndata: tok1\n\n\r\n",
        );
        std::thread::sleep(Duration::from_millis(1500));
        let _ = s.write_all(b"c\r\ndata: tok2\n\n\r\n0\r\n\r\n");
        std::thread::sleep(Duration::from_millis(50));
    });
    let b = backend.to_string();
    let p = Proxy::start(&["--backend", &b, "--shards", "1"]);
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    s.write_all(
        b"POST /events HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("tok1") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the first event");
        got.extend_from_slice(&buf[..n]);
    }
    let first = t.elapsed();
    assert!(
        first < Duration::from_millis(1000),
        "the first event took {first:?}"
    );
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    s.read_to_end(&mut got).unwrap();
    assert!(
        String::from_utf8_lossy(&got).contains("tok2"),
        "{}\n{}",
        String::from_utf8_lossy(&got),
        p.stderr.lock().unwrap()
    );
}

#[test]
fn interim_responses_restart_the_wait_for_the_final_head() {
    // 102 Processing every 300 ms for 1.2 s against an 800 ms response
    // timeout: the backend is working, and the client gets its 200.
    let backend = head_only_backend(|s| {
        for _ in 0..4 {
            let _ = s.write_all(b"HTTP/1.1 102 Processing\r\n\r\n");
            std::thread::sleep(Duration::from_millis(300));
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone");
        std::thread::sleep(Duration::from_millis(50));
    });
    // Forwarded (cache off) and through a cache fill.
    for (name, size) in [("interim", "0"), ("interim-fill", "\"64MiB\"")] {
        let cfg = write_config(
            name,
            &format!(
                "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n[cache]\nsize = {size}\n\
                 [[pool]]\nname = \"p\"\nbackends = [{{ addr = \"{backend}\" }}]\nresponse_timeout = \"800ms\"\n"
            ),
        );
        let p = Proxy::start(&["-c", &cfg]);
        let r = get(p.addr, "/copy");
        assert_eq!((r.status, r.text().as_str()), (200, "done"), "cache {size}");
    }
}

#[test]
fn interim_and_204_answers_lose_their_content_length_and_carry_via() {
    // RFC 9110 §8.6: no Content-Length in a 1xx or a 204 (a lax recipient
    // would take the next bytes for a body); §7.6.3: this hop in the Via
    // of every message forwarded, interim ones included.
    let backend = head_only_backend(|s| {
        let _ = s.write_all(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nContent-Length: 7\r\nVia: 1.1 edge\r\n\r\n\
              HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-Done: 1\r\n\r\n",
        );
        std::thread::sleep(Duration::from_millis(200));
    });
    let b = backend.to_string();
    let p = Proxy::start(&["--backend", &b, "--shards", "1", "--cache-size", "0"]);
    let mut s = p.connect();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while got.windows(4).filter(|w| w == b"\r\n\r\n").count() < 2 {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let (early, last) = text.split_once("\r\n\r\n").unwrap();
    assert!(early.starts_with("HTTP/1.1 103 "), "{text}");
    assert!(early.contains("Link: </a.css>; rel=preload"), "{text}");
    assert!(early.contains("Via: 1.1 edge, 1.1 corral"), "{text}");
    assert!(
        !early.to_ascii_lowercase().contains("content-length"),
        "{text}"
    );
    assert!(last.starts_with("HTTP/1.1 204 "), "{text}");
    assert!(
        last.contains("X-Done: 1") && last.contains("Via: 1.1 corral"),
        "{text}"
    );
    assert!(
        !last.to_ascii_lowercase().contains("content-length"),
        "{text}"
    );
}

#[test]
fn endless_interim_responses_end_in_a_502() {
    // A backend that only ever says 102 Processing: every one restarts the
    // response-head timeout, so a cap on their number ends the wait.
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = written.clone();
    let backend = head_only_backend(move |s| {
        for _ in 0..2000 {
            if s.write_all(b"HTTP/1.1 102 Processing\r\n\r\n").is_err() {
                return;
            }
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let cfg = write_config(
        "interim-cap",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n[cache]\nsize = 0\n\
             [[pool]]\nname = \"p\"\nbackends = [{{ addr = \"{backend}\" }}]\nresponse_timeout = \"5s\"\n"
        ),
    );
    let p = Proxy::start(&["-c", &cfg]);
    let got = raw_exchange(
        p.addr,
        b"GET /copy HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    );
    // The 102s up to the cap reach the client, then the 502.
    assert_eq!(got.matches("HTTP/1.1 102 Processing").count(), 128, "{got}");
    let last = got.rsplit("HTTP/1.1 ").next().unwrap_or("");
    assert!(last.starts_with("502"), "{got}");
    // A cache fill keeps the same cap (its 1xx reach nobody): the backend
    // is left long before it runs out of 102s.
    let cfg = write_config(
        "interim-cap-fill",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n[cache]\nsize = \"64MiB\"\n\
             [[pool]]\nname = \"p\"\nbackends = [{{ addr = \"{backend}\" }}]\nresponse_timeout = \"5s\"\n"
        ),
    );
    let p = Proxy::start(&["-c", &cfg]);
    written.store(0, std::sync::atomic::Ordering::SeqCst);
    let got = raw_exchange(
        p.addr,
        b"GET /fill HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    );
    assert!(got.starts_with("HTTP/1.1 502"), "{got}");
    // Give the backend's writes time to fail on the closed connection.
    std::thread::sleep(Duration::from_millis(300));
    let n = written.load(std::sync::atomic::Ordering::SeqCst);
    assert!(n < 1000, "the fill read {n} interim responses");
}

#[test]
fn a_connection_closed_after_an_interim_answer_is_not_resent() {
    // A pooled connection answers 103 Early Hints and closes: a response
    // byte came back (and reached the client), so this is not a stale
    // connection to retry on quietly: one request, a 103, then a 502.
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    let count = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                loop {
                    // One request head.
                    let mut lines = 0;
                    loop {
                        let mut line = String::new();
                        if std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        lines += 1;
                        if line == "\r\n" && lines > 1 {
                            break;
                        }
                    }
                    match count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                        0 => {
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                        }
                        1 => {
                            let _ = s.write_all(
                                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
                            );
                            return;
                        }
                        _ => {
                            let _ =
                                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nresent");
                        }
                    }
                }
            });
        }
    });
    let b = backend.to_string();
    let p = Proxy::start(&["--backend", &b, "--shards", "1", "--cache-size", "0"]);
    let r = get(p.addr, "/first");
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    let got = raw_exchange(
        p.addr,
        b"GET /second HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(got.matches("HTTP/1.1 103").count(), 1, "{got}");
    assert!(got.contains("HTTP/1.1 502"), "{got}");
    assert!(!got.contains("resent"), "{got}");
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[test]
fn a_backend_that_stops_reading_the_body_is_a_timeout() {
    // The backend takes the head, then neither reads the body nor answers
    // for longer than body_timeout: a 504, as a stalled head write is.
    let backend = head_only_backend(|_| std::thread::sleep(Duration::from_secs(4)));
    let cfg = write_config(
        "body-send-timeout",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n[limits]\nbody_timeout = \"500ms\"\n\
             [[pool]]\nname = \"p\"\nbackends = [{{ addr = \"{backend}\" }}]\n"
        ),
    );
    let p = Proxy::start(&["-c", &cfg]);
    let out = post_while_reading(
        p.addr,
        "POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 64000000\r\n\r\n".into(),
        64_000_000,
    );
    assert!(out.starts_with("HTTP/1.1 504"), "{out:?}");
}

#[test]
fn idle_keep_alive_connections_hold_no_buffers() {
    // Each connection owns 84 KiB of buffers while it serves a request;
    // waiting for the next one it holds none (they go back to the shard's
    // spares), so 1500 idle connections cost a few KiB each, not 84.
    let origin = Origin::start();
    let p = proxy_for(&origin, &["--shards", "1"]);
    assert_eq!(get(p.addr, "/cache/max-age=60/0/idle").status, 200);
    let before = p.rss_bytes();
    let n = 1500;
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = p.connect();
        s.write_all(b"GET /cache/max-age=60/0/idle HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        let r = read_response(&mut BufReader::new(&mut s), false).unwrap();
        assert_eq!(r.status, 200);
        idle.push(s);
    }
    let per_connection = p.rss_bytes().saturating_sub(before) / n as u64;
    assert!(
        per_connection < 16 * 1024,
        "{per_connection} bytes resident per idle connection"
    );
    // They still work.
    for s in idle.iter_mut().step_by(100) {
        s.write_all(b"GET /cache/max-age=60/0/idle HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        let r = read_response(&mut BufReader::new(&mut *s), false).unwrap();
        assert_eq!(r.status, 200);
    }
}
