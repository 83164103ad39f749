//! The cache and collapsed forwarding, end to end: real corral processes,
//! real origins on loopback.

mod common;

use common::*;
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn proxy(origin: &Origin, shards: &str) -> Proxy {
    let b = origin.addr.to_string();
    Proxy::start(&["--backend", &b, "--shards", shards])
}

/// One request with extra header lines on a fresh connection.
fn get_with(p: &Proxy, path: &str, method: &str, extra: &str) -> Response {
    request(p.addr, method, path, extra)
}

#[test]
fn hits_come_from_memory_with_age_and_cache_status() {
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let path = "/cache/max-age=60/0/a";
    let first = get(p.addr, path);
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "a #1 ");
    assert_eq!(
        first.header("Cache-Status"),
        Some("corral; fwd=uri-miss; stored")
    );
    for _ in 0..5 {
        let r = get(p.addr, path);
        assert_eq!(r.text(), "a #1 ");
        let cs = r.header("Cache-Status").unwrap();
        assert!(cs.starts_with("corral; hit; ttl="), "{cs}");
        assert!(r.header("Age").is_some());
        assert_eq!(r.header("Via"), Some("1.1 corral"));
        assert_eq!(r.header("ETag"), Some("\"e1\""));
    }
    assert_eq!(origin.requests_for(path), 1);
    // HEAD is answered from the stored GET.
    let h = get_with(&p, path, "HEAD", "");
    assert_eq!(h.status, 200);
    assert_eq!(h.header("Content-Length"), Some("5"));
    assert!(h.body.is_empty());
    // Client conditionals are answered from the cache.
    let c = get_with(&p, path, "GET", "If-None-Match: \"e1\"\r\n");
    assert_eq!(c.status, 304);
    let c = get_with(
        &p,
        path,
        "GET",
        "If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n",
    );
    assert_eq!(c.status, 304);
    let c = get_with(&p, path, "GET", "If-None-Match: \"other\"\r\n");
    assert_eq!(c.status, 200);
    assert_eq!(origin.requests_for(path), 1);
}

#[test]
fn a_herd_is_one_origin_fetch_whatever_the_shards() {
    for shards in ["1", "2"] {
        let origin = Origin::start();
        let b = origin.addr.to_string();
        let p = Proxy::start(&[
            "--backend",
            &b,
            "--shards",
            shards,
            "--admin",
            "127.0.0.1:0",
        ]);
        // The origin takes a second, so that every request of the herd is
        // in before its answer even on a loaded machine.
        let path = "/cache/max-age=60/1000/herd";
        let n = 500;
        let responses = herd(&p, path, n);
        for r in &responses {
            assert_eq!(r.status, 200);
            assert_eq!(r.text(), "herd #1 ");
        }
        assert_eq!(origin.requests_for(path), 1, "a herd on {shards} shards");
        let said = |word: &str| {
            responses
                .iter()
                .filter(|r| r.header("Cache-Status").is_some_and(|c| c.contains(word)))
                .count()
        };
        let collapsed = said("collapsed");
        // A real herd: most requests joined the fetch. (On a loaded
        // machine some reach corral only after the answer is stored and
        // are hits; every CI run so far had at least 450 of 500 collapsed,
        // two busy loops on both CPUs brought it down to about 200.)
        let hits = said("hit");
        // One response was the fetch's own ("stored"); on 2 shards the
        // first request of the other shard joined it too (collapsed), and
        // the counter says as many as the headers.
        assert_eq!(said("stored"), 1, "{shards} shards");
        assert!(
            collapsed >= n / 4 && collapsed + hits + 1 == n,
            "{collapsed} collapsed, {hits} hits of {n}"
        );
        assert_eq!(
            metric_sum(p.admin_addr(), "corral_collapsed_total"),
            collapsed as f64
        );
        // Followers answered without a body (304 to a conditional, as HEAD
        // and 416 are) are collapsed answers too.
        let path = "/cache/max-age=60/600/herd-heads";
        let rs = herd_with(&p, path, 20, |_| "If-None-Match: *\r\n".to_string());
        assert!(rs.iter().all(|r| r.status == 304));
        let joined = rs
            .iter()
            .filter(|r| {
                r.header("Cache-Status")
                    .is_some_and(|c| c.contains("collapsed"))
            })
            .count();
        assert!(joined >= 5, "{joined}");
        assert_eq!(
            metric_sum(p.admin_addr(), "corral_collapsed_total"),
            (collapsed + joined) as f64
        );
    }
}

#[test]
fn objects_are_fetched_once_each_process_wide() {
    // Fresh connections land on either shard; each object is stored once,
    // in its owner shard, and found from the other.
    let origin = Origin::start();
    let p = proxy(&origin, "2");
    for round in 0..2 {
        for i in 0..100 {
            let r = get(p.addr, &format!("/cache/max-age=60/0/o{i}"));
            assert_eq!(r.text(), format!("o{i} #1 "), "round {round}");
        }
    }
    assert_eq!(origin.requests(), 100);
}

#[test]
fn uncacheable_herd_is_not_serialized() {
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let path = "/cache/private/300/p";
    let n = 40;
    let addr = p.addr;
    let barrier = Arc::new(Barrier::new(n));
    let t = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                get(addr, path)
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().status, 200);
    }
    // Every request went to the origin, in parallel, not one after another.
    assert_eq!(origin.requests_for(path), n);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    // And the key is remembered as uncacheable (hit-for-miss).
    let r = get(addr, path);
    assert_eq!(
        r.header("Cache-Status"),
        Some("corral; fwd=uri-miss; detail=uncacheable")
    );
}

#[test]
fn storage_rules() {
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    // no-store, private and Set-Cookie are not stored; public Set-Cookie is.
    for (path, extra, stored) in [
        ("/cache/no-store/0/ns", "", false),
        ("/cache/private+max-age=60/0/pr", "", false),
        ("/cache/max-age=60/0/ck", "X-Resp-Cookie: 1\r\n", false),
        (
            "/cache/public+max-age=60/0/ckp",
            "X-Resp-Cookie: 1\r\n",
            true,
        ),
        ("/cache/max-age=0/0/zero", "", false),
    ] {
        get_with(&p, path, "GET", extra);
        get_with(&p, path, "GET", extra);
        let want = if stored { 1 } else { 2 };
        assert_eq!(origin.requests_for(path), want, "{path}");
    }
    // Requests with Authorization bypass the cache.
    let path = "/cache/max-age=60/0/auth";
    get(p.addr, path);
    let r = get_with(&p, path, "GET", "Authorization: Basic eDp5\r\n");
    assert_eq!(r.header("Cache-Status"), Some("corral; fwd=bypass"));
    assert_eq!(origin.requests_for(path), 2);
    // Client no-cache goes to the origin; only-if-cached never does.
    let r = get_with(&p, path, "GET", "Cache-Control: no-cache\r\n");
    assert_eq!(r.header("Cache-Status"), Some("corral; fwd=request"));
    assert_eq!(origin.requests_for(path), 3);
    let r = get_with(
        &p,
        "/cache/max-age=60/0/never",
        "GET",
        "Cache-Control: only-if-cached\r\n",
    );
    assert_eq!(r.status, 504);
    // Not even with a request the cache would otherwise pass by.
    let r = get_with(
        &p,
        "/cache/max-age=60/0/never",
        "GET",
        "Cache-Control: no-store, only-if-cached\r\nAuthorization: Basic eDp5\r\n",
    );
    assert_eq!(r.status, 504);
    assert_eq!(origin.requests_for("/cache/max-age=60/0/never"), 0);
}

#[test]
fn vary_keeps_variants_apart() {
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let path = "/cache/max-age=60/0/v";
    let vary = "X-Resp-Vary: Accept-Language\r\n";
    let en = get_with(&p, path, "GET", &format!("{vary}Accept-Language: en\r\n"));
    assert_eq!(en.text(), "v #1 en");
    let en2 = get_with(&p, path, "GET", &format!("{vary}Accept-Language: en\r\n"));
    assert_eq!(en2.text(), "v #1 en");
    let fr = get_with(&p, path, "GET", &format!("{vary}Accept-Language: fr\r\n"));
    assert_eq!(
        fr.text(),
        "v #2 fr",
        "a French request got the English variant"
    );
    // Variants are kept side by side (secondary keys), on every shard: the
    // English one was not pushed out by the French one.
    let p2 = proxy(&origin, "2");
    let path = "/cache/max-age=60/0/v2";
    for (lang, nth) in [("en", 1), ("fr", 2), ("de", 3), ("", 4)] {
        let al = if lang.is_empty() {
            String::new()
        } else {
            format!("Accept-Language: {lang}\r\n")
        };
        for _ in 0..3 {
            let r = get_with(&p2, path, "GET", &format!("{vary}{al}"));
            assert_eq!(r.text(), format!("v2 #{nth} {lang}"));
        }
    }
    assert_eq!(origin.requests_for(path), 4);
    for lang in ["en", "fr", "de"] {
        let r = get_with(
            &p2,
            path,
            "GET",
            &format!("{vary}Accept-Language: {lang}\r\n"),
        );
        assert!(r.header("Cache-Status").unwrap().contains("hit"), "{lang}");
    }
    // A purge of the URL drops every variant.
    assert_eq!(get_with(&p2, path, "PURGE", "").status, 200);
    let r = get_with(&p2, path, "GET", &format!("{vary}Accept-Language: de\r\n"));
    assert_eq!(r.text(), "v2 #5 de");
}

#[test]
fn variants_are_revalidated_each_in_its_own_place() {
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let path = "/cache/max-age=1/0/rv";
    let ask = |lang: &str| {
        get_with(
            &p,
            path,
            "GET",
            &format!("X-Resp-Vary: Accept-Language\r\nAccept-Language: {lang}\r\n"),
        )
    };
    assert_eq!(ask("en").text(), "rv #1 en");
    assert_eq!(ask("fr").text(), "rv #2 fr");
    std::thread::sleep(Duration::from_millis(2100));
    // Each stale variant is revalidated with its own validator (the origin
    // answers 304) and stays where it was: neither replaces the other.
    for (lang, tag) in [("fr", "\"e2\""), ("en", "\"e1\"")] {
        let r = ask(lang);
        assert_eq!(r.header("X-Revalidated"), Some("yes"), "{lang}");
        assert_eq!(origin.last_seen().header("If-None-Match"), Some(tag));
    }
    let (en, fr) = (ask("en"), ask("fr"));
    assert_eq!(
        (en.text(), fr.text()),
        ("rv #1 en".into(), "rv #2 fr".into())
    );
    assert!(fr.header("Cache-Status").unwrap().contains("hit"));
    assert!(en.header("Cache-Status").unwrap().contains("hit"));
    assert_eq!(origin.requests_for(path), 4);
}

#[test]
fn stale_while_revalidate_serves_stale_and_refreshes() {
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    // Fresh for 2 s (so the refreshed copy is still fresh when checked,
    // even on a loaded machine), stale after 3.
    let path = "/cache/max-age=2+stale-while-revalidate=30/0/s";
    assert_eq!(get(p.addr, path).text(), "s #1 ");
    std::thread::sleep(Duration::from_millis(3100));
    let stale = get(p.addr, path);
    assert_eq!(stale.text(), "s #1 ");
    assert!(stale.header("Cache-Status").unwrap().contains("fwd=stale"));
    // One background refresh replaces it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while origin.requests_for(path) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    // The refresh revalidated it (the origin answers 304): fresh again.
    let r = get(p.addr, path);
    assert_eq!(r.text(), "s #1 ");
    assert_eq!(r.header("X-Revalidated"), Some("yes"));
    assert!(
        r.header("Cache-Status").unwrap().starts_with("corral; hit"),
        "{:?}, origin asked {} times",
        r.header("Cache-Status"),
        origin.requests_for(path)
    );
    assert_eq!(origin.requests_for(path), 2);
}

#[test]
fn expired_entries_go_back_to_the_origin() {
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let path = "/cache/max-age=1/0/e";
    assert_eq!(get(p.addr, path).text(), "e #1 ");
    assert_eq!(get(p.addr, path).text(), "e #1 ");
    std::thread::sleep(Duration::from_millis(2100));
    let r = get(p.addr, path);
    // The test origin revalidates with a 304.
    assert_eq!(
        r.header("Cache-Status"),
        Some("corral; fwd=stale; fwd-status=304; stored")
    );
    assert_eq!(origin.requests_for(path), 2);
    // After a purge nothing is stale: a plain fetch.
    assert_eq!(get_with(&p, path, "PURGE", "").status, 200);
    let r = get(p.addr, path);
    assert_eq!(r.text(), "e #3 ");
    assert_eq!(
        r.header("Cache-Status"),
        Some("corral; fwd=uri-miss; stored")
    );
}

#[test]
fn purge_drops_an_entry_on_every_shard() {
    let origin = Origin::start();
    let p = proxy(&origin, "2");
    let path = "/cache/max-age=60/0/pg";
    // Warm both shards' views (fresh connections spread over them).
    for _ in 0..10 {
        assert_eq!(get(p.addr, path).text(), "pg #1 ");
    }
    assert_eq!(get_with(&p, path, "PURGE", "").status, 200);
    assert_eq!(get_with(&p, path, "PURGE", "").status, 404);
    for _ in 0..10 {
        assert_eq!(get(p.addr, path).text(), "pg #2 ");
    }
    assert_eq!(origin.requests_for(path), 2);
}

#[test]
fn pipelined_hits_and_misses_stay_in_order() {
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut all = String::new();
    for i in 0..30 {
        all.push_str(&format!(
            "GET /cache/max-age=60/0/k{} HTTP/1.1\r\nHost: t\r\n\r\n",
            i % 5
        ));
    }
    w.write_all(all.as_bytes()).unwrap();
    for i in 0..30 {
        let resp = read_response(&mut r, false).unwrap();
        assert_eq!(resp.text(), format!("k{} #1 ", i % 5));
    }
    assert_eq!(origin.requests(), 5);
}

#[test]
fn stale_entries_are_revalidated_with_304() {
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let path = "/cache/max-age=1/0/rv";
    assert_eq!(get(p.addr, path).text(), "rv #1 ");
    std::thread::sleep(Duration::from_millis(2100));
    // Stale: corral asks with If-None-Match, the origin says 304, and the
    // stored body is served with the 304's fields merged in.
    let r = get(p.addr, path);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "rv #1 ");
    assert_eq!(r.header("X-Revalidated"), Some("yes"));
    let seen = origin.last_seen();
    assert_eq!(seen.header("If-None-Match"), Some("\"e1\""));
    assert!(seen.header("If-Modified-Since").is_some());
    // Fresh again: no further origin request.
    let r = get(p.addr, path);
    assert!(r.header("Cache-Status").unwrap().contains("hit"));
    assert_eq!(origin.requests_for(path), 2);
}

#[test]
fn a_slow_fill_counts_its_response_delay_in_age() {
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    // The origin takes 2.1 s and sends no Age: the response has aged by
    // the response delay (RFC 9111 §4.2.3) when the first client gets it,
    // and a hit right after says at least as much.
    let path = "/cache/max-age=60/2100/aged";
    let r = get(p.addr, path);
    assert_eq!(r.text(), "aged #1 ");
    let first: u64 = r.header("Age").unwrap().parse().unwrap();
    assert!(first >= 2, "Age {first}");
    let r = get(p.addr, path);
    assert!(r.header("Cache-Status").unwrap().contains("hit"));
    let hit: u64 = r.header("Age").unwrap().parse().unwrap();
    assert!(hit >= first, "Age {hit} after {first}");
}

#[test]
fn followers_of_an_uncacheable_fill_whose_first_reader_left_go_alone() {
    // A background refresh (stale-while-revalidate) has no reader of its
    // own. A request that will not take the stale copy (max-age=0) follows
    // it; the refresh comes back uncacheable (Set-Cookie), so the follower
    // is sent to the origin on its own and gets its 200, not an error.
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    let origin = scripted_origin(move |_, s| {
        let i = seen.fetch_add(1, Ordering::SeqCst) + 1;
        let extra = if i == 2 {
            std::thread::sleep(Duration::from_millis(500));
            "Set-Cookie: s=1\r\n"
        } else {
            ""
        };
        let body = format!("v{i}");
        s.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nCache-Control: max-age=1, stale-while-revalidate=60\r\nETag: \"e{i}\"\r\n{extra}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .is_ok()
    });
    let p = Proxy::start(&["--backend", &origin.to_string(), "--shards", "1"]);
    assert_eq!(get(p.addr, "/swr").text(), "v1");
    std::thread::sleep(Duration::from_millis(2100));
    // Stale: served at once, and the refresh (request 2) starts.
    let r = get(p.addr, "/swr");
    assert_eq!(r.text(), "v1");
    assert!(r.header("Cache-Status").unwrap().contains("fwd=stale"));
    std::thread::sleep(Duration::from_millis(100));
    let r = get_with(&p, "/swr", "GET", "Cache-Control: max-age=0\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "v3");
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

#[test]
fn collapse_timeout_bounds_a_followers_wait_not_the_leaders() {
    // collapse_timeout 200 ms, origin 700 ms: the follower gives up on the
    // fill and goes to the origin alone; the leader waits for its own fill
    // (going alone too would be a third origin request).
    let origin = Origin::start();
    let cfg = write_config(
        "collapse-timeout",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n[cache]\ncollapse_timeout = \"200ms\"\n\
             [[pool]]\nname = \"o\"\nbackends = [{{ addr = \"{}\" }}]\n",
            origin.addr
        ),
    );
    let p = Proxy::start(&["-c", &cfg]);
    let path = "/cache/max-age=60/700/ct";
    let addr = p.addr;
    let leader = std::thread::spawn(move || get(addr, path));
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    let follower = get(p.addr, path);
    assert_eq!(follower.status, 200);
    assert!(
        follower
            .header("Cache-Status")
            .unwrap()
            .contains("collapse-timeout"),
        "{:?}",
        follower.header("Cache-Status")
    );
    // It left the fill after 200 ms and waited 700 ms for its own answer.
    assert!(started.elapsed() >= Duration::from_millis(850));
    let leader = leader.join().unwrap();
    assert_eq!(leader.text(), "ct #1 ");
    assert!(!leader.header("Cache-Status").unwrap().contains("timeout"));
    assert_eq!(origin.requests_for(path), 2);
    // The leader's fill was stored.
    assert!(get(p.addr, path)
        .header("Cache-Status")
        .unwrap()
        .contains("hit"));
}

#[test]
fn a_successful_unsafe_request_invalidates_the_url() {
    // RFC 9111 §4.4: after a 2xx to a POST (or PUT, DELETE…) the stored
    // responses for its URL, every variant included, are not used again.
    let origin = Origin::start();
    let p = proxy(&origin, "2");
    let path = "/cache/max-age=600/0/inv";
    let vary = "X-Resp-Vary: Accept-Language\r\n";
    for lang in ["en", "fr"] {
        let al = format!("{vary}Accept-Language: {lang}\r\n");
        let first = get_with(&p, path, "GET", &al);
        // fr's first request finds en stored: a Vary miss (RFC 9211).
        let want = if lang == "en" {
            "fwd=uri-miss"
        } else {
            "fwd=vary-miss"
        };
        let cs = first.header("Cache-Status").unwrap();
        assert!(cs.starts_with(&format!("corral; {want}")), "{lang}: {cs}");
        let r = get_with(&p, path, "GET", &al);
        assert!(r.header("Cache-Status").unwrap().contains("hit"), "{lang}");
    }
    assert_eq!(origin.requests_for(path), 2);
    let mut s = p.connect();
    s.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(
        read_response(&mut BufReader::new(s), false).unwrap().status,
        200
    );
    assert_eq!(origin.requests_for(path), 3);
    for lang in ["en", "fr"] {
        let r = get_with(
            &p,
            path,
            "GET",
            &format!("{vary}Accept-Language: {lang}\r\n"),
        );
        assert!(!r.header("Cache-Status").unwrap().contains("hit"), "{lang}");
    }
    assert_eq!(origin.requests_for(path), 5);
}

#[test]
fn a_304_without_date_refreshes_the_stored_copy() {
    // The first answer carries a Date; the 304 two seconds later does not.
    // The refreshed copy is dated on the 304's arrival, so it is fresh
    // again (with the old Date kept it looked two seconds old: stale at
    // once, revalidated on every request).
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    let origin = scripted_origin(move |head, s| {
        seen.fetch_add(1, Ordering::SeqCst);
        let reply = if head.to_ascii_lowercase().contains("if-none-match") {
            "HTTP/1.1 304 Not Modified\r\nCache-Control: max-age=2\r\nETag: \"v\"\r\n\r\n"
                .to_string()
        } else {
            let date = httpdate_now();
            format!("HTTP/1.1 200 OK\r\nDate: {date}\r\nCache-Control: max-age=2\r\nETag: \"v\"\r\nContent-Length: 1\r\n\r\nx")
        };
        s.write_all(reply.as_bytes()).is_ok()
    });
    let p = Proxy::start(&["--backend", &origin.to_string(), "--shards", "1"]);
    assert_eq!(get(p.addr, "/d").text(), "x");
    std::thread::sleep(Duration::from_millis(2600));
    assert_eq!(get(p.addr, "/d").text(), "x"); // revalidated: 304
    assert_eq!(n.load(Ordering::SeqCst), 2);
    let r = get(p.addr, "/d");
    assert!(
        r.header("Cache-Status").unwrap().contains("hit"),
        "{:?}",
        r.header("Cache-Status")
    );
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[test]
fn a_304_naming_another_representation_does_not_update_the_stored_one() {
    // Stored: "one" with ETag "v1". The revalidation's 304 says "v2" (an
    // origin that checked only If-Modified-Since): the stored body is not
    // relabelled "v2"; the request gets the current representation. The
    // same with weak tags, and with only a Last-Modified that differs
    // (RFC 9111 §4.3.4).
    const OLD: &str = "Last-Modified: Mon, 07 Dec 2026 10:00:00 GMT";
    const NEW: &str = "Last-Modified: Mon, 07 Dec 2026 11:00:00 GMT";
    for (first, then) in [
        ("ETag: \"v1\"", "ETag: \"v2\""),
        ("ETag: W/\"v1\"", "ETag: W/\"v2\""),
        (OLD, NEW),
    ] {
        let origin = scripted_origin(move |head, s| {
            let lower = head.to_ascii_lowercase();
            let reply = if lower.contains("if-none-match") || lower.contains("if-modified-since") {
                format!("HTTP/1.1 304 Not Modified\r\nCache-Control: max-age=1\r\n{then}\r\n\r\n")
            } else if head.contains("X-First") {
                format!("HTTP/1.1 200 OK\r\nCache-Control: max-age=1\r\n{first}\r\nContent-Length: 3\r\n\r\none")
            } else {
                format!("HTTP/1.1 200 OK\r\nCache-Control: max-age=1\r\n{then}\r\nContent-Length: 3\r\n\r\ntwo")
            };
            s.write_all(reply.as_bytes()).is_ok()
        });
        let p = Proxy::start(&["--backend", &origin.to_string(), "--shards", "1"]);
        assert_eq!(get_with(&p, "/e", "GET", "X-First: 1\r\n").text(), "one");
        std::thread::sleep(Duration::from_millis(2100));
        let r = get(p.addr, "/e");
        assert_eq!(r.text(), "two", "{first} then {then}");
        let (name, value) = then.split_once(": ").unwrap();
        assert_eq!(r.header(name), Some(value));
    }
}

#[test]
fn responses_without_date_are_dated_once_when_forwarded_and_stored() {
    // The origin sends no Date (RFC 9110 §6.6.1: a recipient with a clock
    // adds one). Passed through: dated. Stored: dated on arrival, and every
    // hit carries that same Date, from which its Age counts.
    let origin = scripted_origin(move |head, s| {
        let cc = if head.contains("/nostore") {
            "no-store"
        } else {
            "max-age=60"
        };
        let reply = format!("HTTP/1.1 200 OK\r\nCache-Control: {cc}\r\nContent-Length: 1\r\n\r\nx");
        s.write_all(reply.as_bytes()).is_ok()
    });
    let p = Proxy::start(&["--backend", &origin.to_string(), "--shards", "1"]);
    let passed = get(p.addr, "/nostore");
    let date = passed
        .header("Date")
        .expect("a forwarded response is dated");
    assert!(
        corral::cache::policy::parse_http_date(date.as_bytes()).is_some(),
        "{date}"
    );
    let first = get(p.addr, "/stored");
    let stored = first
        .header("Date")
        .expect("a filled response is dated")
        .to_string();
    std::thread::sleep(Duration::from_millis(1100));
    let hit = get(p.addr, "/stored");
    assert!(hit.header("Cache-Status").unwrap().contains("hit"));
    assert_eq!(hit.header("Date"), Some(stored.as_str()));
    assert!(hit.header("Age").unwrap().parse::<u64>().unwrap() >= 1);
    // corral's own answers are dated too.
    let bad = raw_exchange(
        p.addr,
        b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: z\r\n\r\n",
    );
    assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");
    assert!(bad.contains("\r\nDate: "), "{bad}");
}

/// Now as an HTTP date.
fn httpdate_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    corral::cache::policy::format_http_date(secs)
}

#[test]
fn stale_if_error_answers_for_a_failing_origin() {
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let path = "/cache/max-age=1+stale-if-error=60/0/sie";
    let other = "/cache/max-age=1/0/nosie";
    assert_eq!(get(p.addr, path).text(), "sie #1 ");
    assert_eq!(get(p.addr, other).text(), "nosie #1 ");
    std::thread::sleep(Duration::from_millis(2100));
    origin
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = get(p.addr, path);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "sie #1 ");
    // It says how stale it is: stored more than two seconds ago.
    let age: u64 = r.header("Age").unwrap().parse().unwrap();
    assert!(age >= 2, "Age {age}");
    // And that it is a stale answer to a failed fetch, not something stored.
    assert_eq!(
        r.header("Cache-Status"),
        Some("corral; fwd=stale; detail=stale-if-error")
    );
    // Without stale-if-error the origin's 500 goes through.
    assert_eq!(get(p.addr, other).status, 500);
}

#[test]
fn a_stale_empty_chunked_body_keeps_the_connection_in_step() {
    // An empty body the origin sent chunked, stored, then served stale for
    // a failing origin: the answer is framed once (no second last-chunk
    // left on the connection), so the next response on it reads right.
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let addr = scripted_origin(move |_head, s| {
        let answer: &[u8] = if c.fetch_add(1, Ordering::SeqCst) == 0 {
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=1, stale-if-error=60\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        } else {
            b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"
        };
        s.write_all(answer).is_ok()
    });
    let b = addr.to_string();
    let p = Proxy::start(&["--backend", &b, "--shards", "1"]);
    assert_eq!(get(p.addr, "/e").status, 200);
    std::thread::sleep(Duration::from_millis(2100));
    let s = p.connect();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for path in ["/e", "/e", "/other"] {
        write!(w, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let resp = read_response(&mut r, false).unwrap();
        if path == "/e" {
            assert_eq!(resp.status, 200);
            assert!(resp.body.is_empty());
            assert_eq!(
                resp.header("Cache-Status"),
                Some("corral; fwd=stale; detail=stale-if-error")
            );
        } else {
            assert_eq!(resp.status, 500);
        }
    }
}

#[test]
fn ranges_are_cut_from_the_stored_object() {
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let path = "/cache/max-age=60/0/range-object";
    assert_eq!(get(p.addr, path).text(), "range-object #1 ");
    let r = get_with(&p, path, "GET", "Range: bytes=0-4\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(r.text(), "range");
    assert_eq!(r.header("Content-Range"), Some("bytes 0-4/16"));
    let r = get_with(&p, path, "GET", "Range: bytes=-3\r\n");
    assert_eq!(r.text(), "#1 ");
    let r = get_with(&p, path, "GET", "Range: bytes=100-\r\n");
    assert_eq!(r.status, 416);
    assert_eq!(r.header("Content-Range"), Some("bytes */16"));
    assert_eq!(origin.requests_for(path), 1);
    // If-Match is evaluated against the stored response (as nginx does for
    // its cache hits): a tag it does not have is 412, `*` is the object.
    let r = get_with(
        &p,
        path,
        "GET",
        "If-Match: \"other\"\r\nRange: bytes=0-4\r\n",
    );
    assert_eq!(r.status, 412);
    let r = get_with(&p, path, "GET", "If-Match: *\r\nRange: bytes=0-4\r\n");
    assert_eq!(r.status, 206);
    let r = get_with(&p, path, "HEAD", "If-Match: \"other\"\r\n");
    assert_eq!((r.status, r.body.len()), (412, 0));
    // Range applies to GET only (RFC 9110 §14.2): a HEAD gets the whole
    // representation's head.
    let r = get_with(&p, path, "HEAD", "Range: bytes=0-4\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Length"), Some("16"));
    assert_eq!(r.header("Content-Range"), None);
    assert_eq!(origin.requests_for(path), 1);
}

#[test]
fn a_304_s_age_counts_in_the_refreshed_copy() {
    // The upstream is itself a cache: its 304 is dated now and says the
    // object is 60 s old. The refreshed copy is 60 s old, not new.
    let origin = scripted_origin(move |head, s| {
        let date = httpdate_now();
        let reply = if head.to_ascii_lowercase().contains("if-none-match") {
            format!("HTTP/1.1 304 Not Modified\r\nDate: {date}\r\nAge: 60\r\nCache-Control: max-age=100\r\nETag: \"v\"\r\n\r\n")
        } else {
            format!("HTTP/1.1 200 OK\r\nDate: {date}\r\nCache-Control: max-age=1\r\nETag: \"v\"\r\nContent-Length: 1\r\n\r\nx")
        };
        s.write_all(reply.as_bytes()).is_ok()
    });
    let p = Proxy::start(&["--backend", &origin.to_string(), "--shards", "1"]);
    assert_eq!(get(p.addr, "/age").header("Age"), Some("0"));
    std::thread::sleep(Duration::from_millis(2100));
    let age = |r: &Response| r.header("Age").unwrap().parse::<u64>().unwrap();
    let r = get(p.addr, "/age"); // revalidated: 304
    assert!(r.header("Cache-Status").unwrap().contains("fwd=stale"));
    assert!((60..63).contains(&age(&r)), "{:?}", r.header("Age"));
    let r = get(p.addr, "/age");
    assert!(r.header("Cache-Status").unwrap().contains("hit"));
    assert!((60..63).contains(&age(&r)), "{:?}", r.header("Age"));
}

#[test]
fn a_backend_date_that_does_not_parse_is_replaced_and_via_goes_last() {
    let origin = scripted_origin(move |_, s| {
        s.write_all(b"HTTP/1.1 200 OK\r\nDate: Tue, 15 Nov 2024 08:12:31 +0000\r\nVia: 1.1 a\r\nVia: 1.1 b\r\nCache-Control: max-age=60\r\nContent-Length: 1\r\n\r\nx")
            .is_ok()
    });
    let p = Proxy::start(&["--backend", &origin.to_string(), "--shards", "1"]);
    for _ in 0..2 {
        let mut s = TcpStream::connect(p.addr).unwrap();
        s.write_all(b"GET /d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text).unwrap();
        let dates: Vec<&str> = text.lines().filter(|l| l.starts_with("Date: ")).collect();
        assert_eq!(dates.len(), 1, "{text}");
        assert!(dates[0].ends_with(" GMT"), "{text}");
        // corral is the last hop in the combined Via list.
        let via: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("Via: "))
            .collect();
        assert_eq!(via.join(", "), "1.1 a, 1.1 b, 1.1 corral", "{text}");
    }
}

#[test]
fn collapsed_requests_get_their_own_variant() {
    let origin = Origin::start();
    let p = proxy(&origin, "2");
    let path = "/cache/max-age=60/300/cv";
    let addr = p.addr;
    let handles: Vec<_> = ["en", "fr", "en", "fr", "de"]
        .into_iter()
        .map(|lang| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: test\r\nX-Resp-Vary: Accept-Language\r\nAccept-Language: {lang}\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                (lang, read_response(&mut BufReader::new(s), false).unwrap())
            })
        })
        .collect();
    for h in handles {
        let (lang, r) = h.join().unwrap();
        assert!(r.text().ends_with(lang), "{lang} got {:?}", r.text());
    }
}

#[test]
fn large_hits_are_sent_from_memory_files_whole_and_in_ranges() {
    // From 16 KiB a stored body lives in a memory file and hits go out with
    // sendfile; the bytes must be the same whichever way, on kept-alive
    // connections, in ranges, and to a reader too slow for the socket.
    let origin = Origin::start();
    let p = proxy(&origin, "2");
    let n = 7 * 1024 * 1024 + 17;
    let path = format!("/big/{n}");
    let want = big_body(n);
    assert_eq!(get(p.addr, &path).body, want);
    let mut s = BufReader::new(p.connect());
    for _ in 0..3 {
        write!(s.get_mut(), "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let r = read_response(&mut s, false).unwrap();
        assert!(r.header("Cache-Status").unwrap().starts_with("corral; hit"));
        assert!(r.body == want, "a hit's bytes differ from the origin's");
    }
    write!(
        s.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: test\r\nRange: bytes=20000-1048575\r\n\r\n"
    )
    .unwrap();
    let r = read_response(&mut s, false).unwrap();
    assert_eq!(r.status, 206);
    assert!(r.body == want[20000..1048576]);
    write!(s.get_mut(), "HEAD {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let r = read_response(&mut s, true).unwrap();
    assert_eq!(r.header("Content-Length"), Some(&*n.to_string()));
    assert!(r.body.is_empty());
    // A reader that waits before reading: the socket fills (7 MiB is more
    // than loopback's largest send buffer), the proxy waits for room and
    // goes on.
    let mut slow = p.connect();
    write!(
        slow,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut slow, &mut got).unwrap();
    let body_at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(got[body_at..] == want[..], "the slow reader's bytes differ");
    // Concurrent readers over both shards.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let addr = p.addr;
            let path = path.clone();
            std::thread::spawn(move || get(addr, &path).body)
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap() == want);
    }
    assert_eq!(origin.requests_for(&path), 1);
}

/// An origin that answers every request on a keep-alive connection with
/// `answer(head, stream)` (`head`: the request line and fields as text);
/// `answer` returns whether to keep the connection.
fn scripted_origin(
    answer: impl Fn(&str, &mut TcpStream) -> bool + Send + Sync + 'static,
) -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut head = line;
                    loop {
                        let mut h = String::new();
                        if std::io::BufRead::read_line(&mut r, &mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                        head.push_str(&h);
                    }
                    if !answer(&head, &mut s) {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_fill_that_outgrows_the_size_limit_does_not_fail_other_shards() {
    // A chunked 256 KiB body over about 1.6 s against a 64 KiB object
    // limit: the fetch stops being shareable a quarter of the way in. The
    // requests that come after, on either shard, fetch on their own and
    // get the whole body (they got 502 on the other shard, following a
    // shared fill that had given up but still held its claim).
    let written = Arc::new(AtomicUsize::new(0));
    let pieces = written.clone();
    let origin = scripted_origin(move |_, s| {
        let head =
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n\r\n";
        if s.write_all(head).is_err() {
            return false;
        }
        let chunk = vec![b'x'; 16384];
        for _ in 0..16 {
            let mut piece = b"4000\r\n".to_vec();
            piece.extend_from_slice(&chunk);
            piece.extend_from_slice(b"\r\n");
            if s.write_all(&piece).is_err() {
                return false;
            }
            pieces.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
        }
        s.write_all(b"0\r\n\r\n").is_ok()
    });
    let path = write_config(
        "outgrown-shards",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n\
             [cache]\nmax_object_size = \"64KiB\"\n\
             [[pool]]\nname = \"o\"\nbackends = [{{ addr = \"{origin}\" }}]\n"
        ),
    );
    let p = Proxy::start(&["-c", &path]);
    let addr = p.addr;
    let first = std::thread::spawn(move || get(addr, "/big"));
    // Past the limit: the first fetch has stopped being shared (it has 64
    // KiB after four pieces; wait for six).
    let t = Instant::now();
    while written.load(Ordering::SeqCst) < 6 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let later: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || get(addr, "/big")))
        .collect();
    for h in std::iter::once(first).chain(later) {
        let r = h.join().unwrap();
        let status = r.header("cache-status").unwrap_or("").to_string();
        assert_eq!((r.status, r.body.len()), (200, 16 * 16384), "{status}");
    }
}

#[test]
fn a_request_after_a_purge_does_not_join_a_fetch_from_before_it() {
    // The first fetch is slow; a purge of the URL comes while it is in
    // flight: a request after the purge gets a fetch of its own (the one
    // in flight may be bringing what was purged), on either shard.
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    let origin = scripted_origin(move |_, s| {
        let v = seen.fetch_add(1, Ordering::SeqCst) + 1;
        if v == 1 {
            std::thread::sleep(Duration::from_millis(1500));
        }
        let reply = format!(
            "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\n\r\nv{v}"
        );
        s.write_all(reply.as_bytes()).is_ok()
    });
    let p = Proxy::start(&["--backend", &origin.to_string(), "--shards", "2"]);
    let addr = p.addr;
    let first = std::thread::spawn(move || get(addr, "/p").text());
    // The first fetch is under way (at the origin) before the purge.
    let t = Instant::now();
    while n.load(Ordering::SeqCst) == 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Nothing is stored yet (404), but the purge is logged all the same.
    assert_eq!(get_with(&p, "/p", "PURGE", "").status, 404);
    let after: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || get(addr, "/p").text()))
        .collect();
    for h in after {
        assert_eq!(h.join().unwrap(), "v2");
    }
    assert_eq!(first.join().unwrap(), "v1");
    // The purged fetch did not store: v2 is what is stored now.
    assert_eq!(get(addr, "/p").text(), "v2");
}

#[test]
fn a_stored_error_is_not_answered_304() {
    // Preconditions apply only where the answer would be 2xx (RFC 9110
    // §13.2.1): a cached 404 with an ETag stays a 404.
    let origin = scripted_origin(|_, s| {
        s.write_all(b"HTTP/1.1 404 Not Found\r\nCache-Control: max-age=60\r\nETag: \"x\"\r\nContent-Length: 4\r\n\r\nnope")
            .is_ok()
    });
    let b = origin.to_string();
    let p = Proxy::start(&["--backend", &b, "--shards", "1"]);
    assert_eq!(get(p.addr, "/gone").status, 404);
    let hit = get(p.addr, "/gone");
    assert!(hit.header("Cache-Status").unwrap().contains("hit"));
    for cond in ["If-None-Match: \"x\"\r\n", "If-None-Match: *\r\n"] {
        let r = get_with(&p, "/gone", "GET", cond);
        assert_eq!(r.status, 404, "{cond}");
        assert_eq!(r.text(), "nope");
    }
}

#[test]
fn a_transfer_coding_corral_cannot_decode_is_a_502_and_not_stored() {
    // A backend that sends a transfer coding other than one `chunked`
    // (with or without a Content-Length): corral cannot decode it, and the
    // field is hop-by-hop, so forwarding the bytes without it would serve
    // (and store) coded content as plain. Each is a 502, every time (never
    // a hit), and the chunked one after them is served and stored.
    let origin = scripted_origin(|req, s| {
        let te = if req.contains("/gzip-len") {
            "gzip\r\nContent-Length: 5"
        } else if req.contains("/gzip-chunked") {
            "gzip, chunked"
        } else if req.contains("/twice") {
            "chunked, chunked"
        } else {
            "chunked;x=1"
        };
        let _ = s.write_all(
            format!("HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n").as_bytes(),
        );
        false
    });
    let b = origin.to_string();
    let p = Proxy::start(&["--backend", &b, "--shards", "1"]);
    for path in ["/gzip-len", "/gzip-chunked", "/twice"] {
        for _ in 0..2 {
            let r = get(p.addr, path);
            assert_eq!(r.status, 502, "{path}");
            assert!(
                !r.header("Cache-Status").unwrap_or("").contains("hit"),
                "{path}"
            );
        }
    }
    let r = get(p.addr, "/params");
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    let r = get(p.addr, "/params");
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    assert!(r.header("Cache-Status").unwrap().contains("hit"));
}

#[test]
fn a_response_larger_than_a_shard_s_share_of_the_cache_is_not_said_stored() {
    // 8 MiB over 2 shards: 3.75 MiB partitions, below the default 8 MiB
    // max_object_size. A 6 MB response can never be stored: it passes
    // through marked uncacheable (not "stored", then fetched again as if
    // it had been dropped), and start-up says where the limit went.
    let body = vec![b'z'; 6_000_000];
    let origin = scripted_origin(move |_, s| {
        let head = format!(
            "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).is_ok() && s.write_all(&body).is_ok()
    });
    let b = origin.to_string();
    let p = Proxy::start(&["--backend", &b, "--shards", "2", "--cache-size", "8MiB"]);
    for _ in 0..2 {
        let r = get(p.addr, "/big");
        assert_eq!((r.status, r.body.len()), (200, 6_000_000));
        let cs = r.header("Cache-Status").unwrap();
        assert!(cs.contains("uncacheable") && !cs.contains("stored"), "{cs}");
    }
    let err = p.stderr.lock().unwrap().clone();
    assert!(err.contains("pass through unstored"), "{err}");
}

#[test]
fn a_follower_of_a_fill_that_outgrows_the_cache_gets_the_whole_body() {
    // The fill's head arrives, a second client joins it, then the body
    // comes in one burst past max_object_size: the fill stops being shared
    // before the follower took a byte. The follower, whose response head
    // was already under way, must still get the whole body (here, from the
    // origin on its own), and its connection must stay usable.
    let body: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let expect = String::from_utf8(body.clone()).unwrap();
    let origin = scripted_origin(move |_, s| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        std::thread::sleep(Duration::from_millis(300));
        let mut out = format!("{:x}\r\n", body.len()).into_bytes();
        out.extend_from_slice(&body);
        out.extend_from_slice(b"\r\n0\r\n\r\n");
        s.write_all(&out).is_ok()
    });
    let cfg = write_config(
        "outgrown",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n[cache]\nsize = \"8MiB\"\nmax_object_size = \"16KiB\"\n\
             [[pool]]\nname = \"o\"\nbackends = [{{ addr = \"{origin}\" }}]\n"
        ),
    );
    let p = Proxy::start(&["-c", &cfg]);
    let addr = p.addr;
    let leader = std::thread::spawn(move || get(addr, "/big"));
    std::thread::sleep(Duration::from_millis(100));
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let follower = read_response(&mut r, false).unwrap();
    assert_eq!(follower.status, 200);
    assert!(
        follower.text() == expect,
        "follower body: {} bytes",
        follower.body.len()
    );
    let first = leader.join().unwrap();
    assert!(
        first.text() == expect,
        "leader body: {} bytes",
        first.body.len()
    );
    // The same connection goes on.
    s.write_all(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut r, false).unwrap().status, 200);
}

#[test]
fn a_304_that_sets_a_cookie_is_not_stored_for_others() {
    // Revalidation merges the 304's fields into the stored response; a
    // Set-Cookie among them makes it per-user: the client that revalidated
    // gets it, the next client must not get that cookie from the cache.
    // Also with a body larger than a lagging reader may fall behind a
    // stream (8 MiB): the stored body is served whole to the one reader,
    // not cut into a 502.
    for (len, size) in [(3usize, "64MiB"), (10 << 20, "256MiB")] {
        let body: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let expect = String::from_utf8(body.clone()).unwrap();
        let origin = scripted_origin(move |head, s| {
            if head.to_ascii_lowercase().contains("if-none-match") {
                s.write_all(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nCache-Control: max-age=600\r\nSet-Cookie: sid=X\r\n\r\n").is_ok()
            } else {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nCache-Control: max-age=1\r\nETag: \"v1\"\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                s.write_all(head.as_bytes()).is_ok() && s.write_all(&body).is_ok()
            }
        });
        let cfg = write_config(
            &format!("cookie304-{len}"),
            &format!(
                "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n\
                 [cache]\nsize = \"{size}\"\nmax_object_size = \"32MiB\"\n\
                 [[pool]]\nname = \"p\"\nbackends = [{{ addr = \"{origin}\" }}]\n"
            ),
        );
        let p = Proxy::start(&["-c", &cfg]);
        assert_eq!(get(p.addr, "/c").text(), expect);
        std::thread::sleep(Duration::from_millis(2100));
        let mine = get(p.addr, "/c");
        assert_eq!((mine.status, mine.body.len()), (200, len));
        assert!(mine.text() == expect);
        assert_eq!(mine.header("Set-Cookie"), Some("sid=X"));
        for _ in 0..3 {
            let other = get(p.addr, "/c");
            assert!(other.text() == expect);
            assert_eq!(
                other.header("Set-Cookie"),
                None,
                "another client got the cookie"
            );
        }
    }
}

#[test]
fn a_purge_during_a_fetch_keeps_its_result_out_of_the_cache() {
    // The fetch began before the purge: what it brings back may be what the
    // purge meant to drop, so it is served but not stored.
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let path = "/cache/max-age=60/500/purged-in-flight";
    let addr = p.addr;
    let first = std::thread::spawn(move || get(addr, path));
    std::thread::sleep(Duration::from_millis(150));
    let purge = get_with(&p, path, "PURGE", "");
    assert!(
        purge.status == 200 || purge.status == 404,
        "{}",
        purge.status
    );
    assert_eq!(first.join().unwrap().text(), "purged-in-flight #1 ");
    let after = get(p.addr, path);
    assert_eq!(after.text(), "purged-in-flight #2 ");
    assert_eq!(origin.requests_for(path), 2);
}

#[test]
fn a_purge_of_another_key_during_a_fetch_does_not_keep_it_out() {
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let path = "/cache/max-age=60/500/kept";
    let addr = p.addr;
    let first = std::thread::spawn(move || get(addr, path));
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(
        get_with(&p, "/cache/max-age=60/0/other", "PURGE", "").status,
        404
    );
    assert_eq!(first.join().unwrap().text(), "kept #1 ");
    let after = get(p.addr, path);
    assert!(after.header("Cache-Status").unwrap().contains("hit"));
    assert_eq!(origin.requests_for(path), 1);
}

#[test]
fn with_collapsing_off_misses_fetch_alone_and_are_still_stored() {
    // `collapse = false`: a herd is as many origin fetches as requests (on
    // both shards, none joins another), and what they fetched is stored.
    let origin = Origin::start();
    let cfg = write_config(
        "collapse-off",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n[cache]\ncollapse = false\n\
             [[pool]]\nname = \"o\"\nbackends = [{{ addr = \"{}\" }}]\n",
            origin.addr
        ),
    );
    let p = Proxy::start(&["-c", &cfg]);
    let path = "/cache/max-age=60/300/off";
    let n = 20;
    let barrier = Arc::new(Barrier::new(n));
    let addr = p.addr;
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                get(addr, path)
            })
        })
        .collect();
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200);
        let cs = r.header("Cache-Status").unwrap();
        assert!(
            cs.contains("fwd=uri-miss") && !cs.contains("collapsed"),
            "{cs}"
        );
    }
    assert_eq!(origin.requests_for(path), n);
    // Stored (by one of them, in its owner shard): the next ones are hits
    // on either shard.
    for _ in 0..6 {
        let r = get(p.addr, path);
        assert!(r.header("Cache-Status").unwrap().contains("hit"));
    }
    assert_eq!(origin.requests_for(path), n);
}

/// `n` concurrent GETs of `path` on fresh connections, released together.
fn herd(p: &Proxy, path: &'static str, n: usize) -> Vec<Response> {
    herd_with(p, path, n, |_| String::new())
}

/// `n` GETs of `path`, request `i` with the header lines `fields(i)`, each
/// on its own connection, connected first and then sent together.
fn herd_with(
    p: &Proxy,
    path: &'static str,
    n: usize,
    fields: impl Fn(usize) -> String,
) -> Vec<Response> {
    let barrier = Arc::new(Barrier::new(n));
    let addr = p.addr;
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let b = barrier.clone();
            let fields = fields(i);
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                b.wait();
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: test\r\n{fields}Connection: close\r\n\r\n"
                )
                .unwrap();
                read_response(&mut BufReader::new(s), false).unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn an_origin_error_answers_the_whole_herd_and_is_not_remembered() {
    // The origin answers 500 (no freshness) after 300 ms: the herd waiting
    // on its fetch gets that 500, rather than going to a failing origin one
    // by one; and the key is not marked uncacheable, so the next herd is
    // one fetch again, and once the origin recovers its answer is stored.
    let origin = Origin::start();
    let p = proxy(&origin, "2");
    let path = "/cache/max-age=60/300/err";
    origin.failing.store(true, Ordering::SeqCst);
    for round in 1..=2 {
        let rs = herd(&p, path, 40);
        assert!(rs.iter().all(|r| r.status == 500 && r.text() == "down"));
        assert_eq!(origin.requests_for(path), round, "round {round}");
        // The first request on each shard says where the answer came from;
        // the others joined it.
        let first = rs
            .iter()
            .filter(|r| r.header("Cache-Status") == Some("corral; fwd=uri-miss; fwd-status=500"))
            .count();
        let collapsed = rs
            .iter()
            .filter(|r| r.header("Cache-Status") == Some("corral; fwd=uri-miss; collapsed"))
            .count();
        assert!((1..=2).contains(&first), "{first} first on a shard");
        assert_eq!(first + collapsed, rs.len());
    }
    origin.failing.store(false, Ordering::SeqCst);
    let rs = herd(&p, path, 40);
    assert!(rs.iter().all(|r| r.status == 200 && r.text() == "err #3 "));
    assert_eq!(origin.requests_for(path), 3);
    assert!(get(p.addr, path)
        .header("Cache-Status")
        .unwrap()
        .contains("hit"));
}

#[test]
fn a_herd_on_a_stream_that_outgrows_the_cache_gets_it_whole() {
    // 256 KiB, chunked, in 16 pieces 60 ms apart, against a 64 KiB object
    // limit; a herd of 6 joins the fetch at once, so every one of them is
    // reading when it stops being cacheable a quarter of the way in. They
    // read on to the end (they were cut with a 502, a truncated body),
    // from the one origin fetch.
    for shards in ["1", "2"] {
        let fetches = Arc::new(AtomicUsize::new(0));
        let counted = fetches.clone();
        let origin = scripted_origin(move |_, s| {
            counted.fetch_add(1, Ordering::SeqCst);
            let head = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n\r\n";
            if s.write_all(head).is_err() {
                return false;
            }
            for i in 0..16u8 {
                let mut piece = b"4000\r\n".to_vec();
                piece.extend(std::iter::repeat_n(b'a' + i, 16384));
                piece.extend_from_slice(b"\r\n");
                if s.write_all(&piece).is_err() {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(60));
            }
            s.write_all(b"0\r\n\r\n").is_ok()
        });
        let path = write_config(
            &format!("outgrown-herd-{shards}"),
            &format!(
                "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = {shards}\n\
                 [cache]\nmax_object_size = \"64KiB\"\n\
                 [[pool]]\nname = \"o\"\nbackends = [{{ addr = \"{origin}\" }}]\n"
            ),
        );
        let p = Proxy::start(&["-c", &path]);
        let expect: Vec<u8> = (0..16u8)
            .flat_map(|i| std::iter::repeat_n(b'a' + i, 16384))
            .collect();
        for r in herd(&p, "/stream", 6) {
            let status = r.header("cache-status").unwrap_or("").to_string();
            assert_eq!(r.status, 200, "{shards} shards: {status}");
            assert!(
                r.body == expect,
                "{shards} shards: {} bytes, {status}",
                r.body.len()
            );
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "{shards} shards");
    }
}

#[test]
fn every_spelling_of_a_uri_is_one_cache_entry() {
    // Host case, the default port and the absolute form do not make
    // another URI (RFC 9110 §4.2.3): one stored entry answers them all, and
    // a POST to any spelling invalidates it (RFC 9111 §4.4).
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let path = "/cache/max-age=60/0/spell";
    let ask = |target: &str, host: &str, method: &str| {
        let mut s = TcpStream::connect(p.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        read_response(&mut BufReader::new(s), false).unwrap()
    };
    assert_eq!(ask(path, "example.com", "GET").text(), "spell #1 ");
    for (target, host) in [
        (path.to_string(), "Example.COM"),
        (path.to_string(), "example.com:80"),
        (format!("http://example.com{path}"), "other"),
        (format!("http://EXAMPLE.com:80{path}"), "example.com"),
    ] {
        let r = ask(&target, host, "GET");
        assert!(
            r.header("Cache-Status").unwrap().contains("hit"),
            "{target} {host}: {:?}",
            r.header("Cache-Status")
        );
    }
    // Another port is another origin.
    let r = ask(path, "example.com:8080", "GET");
    assert!(!r.header("Cache-Status").unwrap().contains("hit"));
    assert_eq!(
        ask(&format!("http://Example.com:80{path}"), "x", "POST").status,
        200
    );
    let r = ask(path, "example.com", "GET");
    assert!(
        !r.header("Cache-Status").unwrap().contains("hit"),
        "invalidated"
    );
}

/// An origin that answers every request with a chunked body of `pieces`
/// pieces of `size` bytes (piece i filled with b'a' + i % 26), after
/// `delay` ms, counting its fetches. The first 16 KiB go in four pieces
/// 250 ms apart (so requests that joined the fetch have started reading
/// when it outgrows a 64 KiB limit, even on a busy machine), the rest as
/// fast as it can.
fn streaming_origin(
    pieces: usize,
    size: usize,
    delay: u64,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counted = fetches.clone();
    let addr = scripted_origin(move |_, s| {
        counted.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(delay));
        let head =
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n\r\n";
        if s.write_all(head).is_err() {
            return false;
        }
        for _ in 0..4 {
            let mut piece = b"1000\r\n".to_vec();
            piece.extend(std::iter::repeat_n(b'-', 4096));
            piece.extend_from_slice(b"\r\n");
            if s.write_all(&piece).is_err() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        for i in 0..pieces {
            let mut piece = format!("{size:x}\r\n").into_bytes();
            piece.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, size));
            piece.extend_from_slice(b"\r\n");
            if s.write_all(&piece).is_err() {
                return false;
            }
        }
        s.write_all(b"0\r\n\r\n").is_ok()
    });
    (addr, fetches)
}

fn outgrowing_proxy(name: &str, origin: std::net::SocketAddr, shards: &str) -> Proxy {
    let path = write_config(
        name,
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = {shards}\n\
             [cache]\nmax_object_size = \"64KiB\"\n\
             [[pool]]\nname = \"o\"\nbackends = [{{ addr = \"{origin}\" }}]\n"
        ),
    );
    Proxy::start(&["-c", &path])
}

#[test]
fn a_head_leading_a_stream_that_outgrows_the_cache_does_not_cut_its_followers() {
    // The request the fetch is made for is a HEAD: it leaves with the head.
    // The GETs that joined read the 4 MiB on (paced on the fastest of them,
    // on whichever shard) from the one fetch.
    for shards in ["1", "2"] {
        let (origin, fetches) = streaming_origin(128, 32 * 1024, 300);
        let p = outgrowing_proxy(&format!("head-leads-{shards}"), origin, shards);
        let addr = p.addr;
        let head = std::thread::spawn(move || request(addr, "HEAD", "/s", ""));
        std::thread::sleep(Duration::from_millis(100));
        let gets: Vec<_> = (0..6)
            .map(|_| std::thread::spawn(move || get(addr, "/s")))
            .collect();
        assert_eq!(head.join().unwrap().status, 200);
        for g in gets {
            let r = g.join().unwrap();
            assert_eq!(
                (r.status, r.body.len()),
                (200, 16384 + 128 * 32 * 1024),
                "{shards} shards"
            );
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "{shards} shards");
    }
}

#[test]
fn a_reader_far_behind_a_stream_that_outgrew_the_cache_is_cut() {
    // 48 MiB, demoted at 64 KiB: one follower reads at once, the other
    // stops reading (with a small receive buffer) until the fast one has
    // it all. The fast one is not held back; the slow one is cut (8 MiB
    // behind, past what the sockets buffer): a truncated body, never the
    // end of it, and no second fetch.
    let (origin, fetches) = streaming_origin(192, 256 * 1024, 300);
    let p = outgrowing_proxy("slow-cut", origin, "1");
    let addr = p.addr;
    let (done, fast_done) = std::sync::mpsc::channel::<()>();
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let small: libc::c_int = 64 * 1024;
        set_socket_option(&s, libc::SO_RCVBUF, &small);
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut first = [0u8; 4096];
        let n = std::io::Read::read(&mut s, &mut first).unwrap();
        let _ = fast_done.recv_timeout(Duration::from_secs(30));
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut rest);
        let mut all = first[..n].to_vec();
        all.extend_from_slice(&rest);
        all
    });
    // The slow one joins first (it is reading the head when the fast one
    // asks; the fetch waits 300 ms for the origin).
    std::thread::sleep(Duration::from_millis(100));
    let r = get(addr, "/big");
    done.send(()).unwrap();
    assert_eq!((r.status, r.body.len()), (200, 16384 + 192 * 256 * 1024));
    let all = slow.join().unwrap();
    assert!(all.starts_with(b"HTTP/1.1 200"));
    assert!(all.len() < 192 * 256 * 1024, "{} bytes", all.len());
    assert!(!all.ends_with(b"0\r\n\r\n"), "the slow reader got the end");
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
}

#[test]
fn a_miss_answers_the_request_s_conditionals() {
    // The fill asks for the whole representation, without the client's
    // conditionals; they are evaluated on what it brings, as on a hit.
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let r = get_with(
        &p,
        "/cache/max-age=60/0/inm",
        "GET",
        "If-None-Match: \"e1\"\r\n",
    );
    assert_eq!((r.status, r.body.len()), (304, 0));
    assert_eq!(r.header("ETag"), Some("\"e1\""));
    let r = get_with(
        &p,
        "/cache/max-age=60/0/im",
        "GET",
        "If-Match: \"other\"\r\n",
    );
    assert_eq!(r.status, 412);
    // Both fetches were stored all the same.
    for path in ["/cache/max-age=60/0/inm", "/cache/max-age=60/0/im"] {
        let r = get(p.addr, path);
        assert!(r.header("Cache-Status").unwrap().contains("hit"), "{path}");
    }
    assert_eq!(origin.requests(), 2);
}

#[test]
fn a_failed_background_refresh_holds_the_next_ones_back() {
    // Stale-while-revalidate against an origin that now answers 500: the
    // stale copy keeps answering, and after the first refresh fails the
    // next stale hits start none for a while (not one per hit).
    // Also when stale-if-error answers the failed refresh (it returned
    // before the hold), and on 2 shards, where a shard relaying another's
    // failed refresh holds its own next ones too: at most one refresh per
    // shard.
    for (path, shards, most) in [
        (
            "/cache/max-age=1+stale-while-revalidate=30/0/swr-fail",
            "1",
            2,
        ),
        (
            "/cache/max-age=1+stale-while-revalidate=30+stale-if-error=60/0/swr-sie",
            "1",
            2,
        ),
        (
            "/cache/max-age=1+stale-while-revalidate=30/0/swr-fail2",
            "2",
            3,
        ),
    ] {
        let origin = Origin::start();
        let p = proxy(&origin, shards);
        assert_eq!(get(p.addr, path).status, 200);
        std::thread::sleep(Duration::from_millis(1200));
        origin.failing.store(true, Ordering::SeqCst);
        let name = path.rsplit('/').next().unwrap();
        for _ in 0..10 {
            let r = get(p.addr, path);
            assert_eq!((r.status, r.text()), (200, format!("{name} #1 ")));
            std::thread::sleep(Duration::from_millis(50));
        }
        let n = origin.requests_for(path);
        assert!(n >= 2 && n <= most, "{path}: {n} origin requests");
    }
}

#[test]
fn a_herd_split_over_variants_is_one_fetch_per_variant() {
    // 24 requests at once for one URL whose response varies on
    // Accept-Language, in three languages, on 1 and 2 shards: each
    // language is fetched once (the requests whose language differs from
    // the first fetch's join a fetch of their own variant), and everyone
    // gets their own language.
    for shards in ["1", "2"] {
        let origin = Origin::start();
        let p = proxy(&origin, shards);
        let path = "/cache/max-age=60/300/herd-vary";
        let lang = |i: usize| ["en", "fr", "de"][i % 3];
        let rs = herd_with(&p, path, 24, |i| {
            format!(
                "X-Resp-Vary: Accept-Language\r\nAccept-Language: {}\r\n",
                lang(i)
            )
        });
        for (i, r) in rs.iter().enumerate() {
            assert_eq!(r.status, 200);
            assert!(
                r.text().ends_with(lang(i)),
                "{} got {:?}",
                lang(i),
                r.text()
            );
        }
        assert_eq!(origin.requests_for(path), 3, "{shards} shards");
    }
}

#[test]
fn a_later_request_joins_its_variant_s_fetch_in_flight() {
    // en leads the URL's fetch (300 ms) and fr's requests move to a fetch
    // of their own variant when its head comes; an fr request arriving
    // while that one is in flight (en stored by then) joins it.
    let origin = Origin::start();
    let p = proxy(&origin, "1");
    let path = "/cache/max-age=60/300/later-variant";
    let addr = p.addr;
    let ask = move |lang: &'static str| {
        std::thread::spawn(move || {
            let fields = format!("X-Resp-Vary: Accept-Language\r\nAccept-Language: {lang}\r\n");
            request(addr, "GET", path, &fields)
        })
    };
    let en = ask("en");
    std::thread::sleep(Duration::from_millis(50));
    let fr = ask("fr");
    assert!(en.join().unwrap().text().ends_with("en"));
    std::thread::sleep(Duration::from_millis(100));
    let late = ask("fr");
    assert!(fr.join().unwrap().text().ends_with("fr"));
    let late = late.join().unwrap();
    assert!(late.text().ends_with("fr"), "{:?}", late.text());
    assert_eq!(origin.requests_for(path), 2);
}

#[test]
fn a_range_on_a_miss_is_cut_from_the_fetch() {
    // The fill fetches the whole representation; each request joined to
    // it gets its own range of it (206, or 416) as it streams, and the
    // object is stored whole.
    let origin = Origin::start();
    let p = proxy(&origin, "2");
    let path = "/cache/max-age=60/300/range-miss";
    let ranges = ["bytes=0-4", "bytes=6-", "bytes=-3", "bytes=100-", ""];
    let rs = herd_with(&p, path, ranges.len(), |i| match ranges[i] {
        "" => String::new(),
        r => format!("Range: {r}\r\n"),
    });
    // The body is "range-miss #1 " (14 bytes).
    for (range, r) in ranges.into_iter().zip(rs) {
        let want: (u16, &str, Option<&str>) = match range {
            "bytes=0-4" => (206, "range", Some("bytes 0-4/14")),
            "bytes=6-" => (206, "miss #1 ", Some("bytes 6-13/14")),
            "bytes=-3" => (206, "#1 ", Some("bytes 11-13/14")),
            "bytes=100-" => (416, "", Some("bytes */14")),
            _ => (200, "range-miss #1 ", None),
        };
        assert_eq!(
            (r.status, r.text().as_str(), r.header("Content-Range")),
            want,
            "{range}"
        );
    }
    assert_eq!(origin.requests_for(path), 1);
    let r = get(p.addr, path);
    assert_eq!(r.text(), "range-miss #1 ");
    assert!(r.header("Cache-Status").unwrap().contains("hit"));
    // The connection stays usable after a range cut from a fetch.
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /cache/max-age=60/0/ka-range HTTP/1.1\r\nHost: test\r\nRange: bytes=0-1\r\n\r\nGET /cache/max-age=60/0/ka-range HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut rd = BufReader::new(s);
    let r = read_response(&mut rd, false).unwrap();
    assert_eq!((r.status, r.text().as_str()), (206, "ka"));
    let r = read_response(&mut rd, false).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ka-range #1 "));
}

#[test]
fn a_range_of_an_uncacheable_response_goes_to_the_origin_with_its_range() {
    // The fill's whole-object answer turns out not storable (private): the
    // range request is sent to the origin as asked, not cut from a whole
    // download of it.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let origin = scripted_origin(move |head, s| {
        let range = head
            .lines()
            .find_map(|l| l.strip_prefix("Range: "))
            .map(str::to_string);
        log.lock().unwrap().push(range.clone());
        let reply = match range.as_deref() {
            Some("bytes=2-3") => "HTTP/1.1 206 Partial Content\r\nCache-Control: private\r\nContent-Range: bytes 2-3/10\r\nContent-Length: 2\r\n\r\n23".to_string(),
            _ => "HTTP/1.1 200 OK\r\nCache-Control: private\r\nContent-Length: 10\r\n\r\n0123456789".to_string(),
        };
        s.write_all(reply.as_bytes()).is_ok()
    });
    let p = Proxy::start(&["--backend", &origin.to_string(), "--shards", "1"]);
    let r = get_with(&p, "/private", "GET", "Range: bytes=2-3\r\n");
    assert_eq!((r.status, r.text().as_str()), (206, "23"));
    assert_eq!(r.header("Content-Range"), Some("bytes 2-3/10"));
    // Asked whole by the fill (not storable), then with the range; after
    // that hit-for-miss sends ranges straight on.
    let r = get_with(&p, "/private", "GET", "Range: bytes=2-3\r\n");
    assert_eq!((r.status, r.text().as_str()), (206, "23"));
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            None,
            Some("bytes=2-3".to_string()),
            Some("bytes=2-3".to_string())
        ]
    );
}

#[test]
fn an_http10_client_sees_a_reset_when_a_fill_of_unknown_length_dies() {
    // HTTP/1.0 gets a close-delimited body (no chunked): when the origin
    // dies mid-body, a FIN would look like the body's end, so corral
    // resets the connection; the client sees an error, not a short 200.
    let origin = scripted_origin(|_, s| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        );
        std::thread::sleep(Duration::from_millis(200));
        false // closes without the last chunk
    });
    let p = Proxy::start(&["--backend", &origin.to_string(), "--shards", "1"]);
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /dies HTTP/1.0\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => break None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Some(e.kind()),
        }
    };
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("transfer-encoding"),
        "{text}"
    );
    assert!(text.ends_with("hello"), "{text}");
    assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset), "{text}");
}

#[test]
fn a_slow_steady_reader_gets_a_large_hit_whole() {
    // body_timeout bounds each wait for the client to take bytes (nginx's
    // send_timeout), not the whole body: a 16 MiB hit read at about 6 MB/s
    // takes some 2.5 s against a 1 s body_timeout. It was one deadline for
    // the whole body, and the reader was cut off. (Each wait is for the
    // kernel to report room, when a third of the send buffer is free: at
    // this pace about 0.2 s.)
    const SIZE: usize = 16 << 20;
    let origin = Origin::start();
    let path = write_config(
        "slow-reader",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n\
             [limits]\nbody_timeout = \"1s\"\n\
             [cache]\nmax_object_size = \"32MiB\"\n\
             [[pool]]\nname = \"o\"\nbackends = [{{ addr = \"{}\" }}]\n",
            origin.addr
        ),
    );
    let p = Proxy::start(&["-c", &path]);
    let url = format!("/big/{SIZE}");
    let first = get(p.addr, &url);
    assert_eq!(first.body.len(), SIZE);
    assert_eq!(
        first.header("Cache-Status"),
        Some("corral; fwd=uri-miss; stored")
    );
    // The copy is in the cache once the fill has ended (just after its
    // reader's last byte).
    let t = Instant::now();
    while !get(p.addr, &url)
        .header("Cache-Status")
        .unwrap_or("")
        .starts_with("corral; hit")
    {
        assert!(t.elapsed() < Duration::from_secs(10), "never a hit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = p.connect();
    // A small receive buffer, so that the proxy's writes wait on the reader.
    let small: libc::c_int = 16 * 1024;
    // SAFETY: setsockopt on an open socket with a valid int.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let mut w = s.try_clone().unwrap();
    write!(w, "GET {url} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    use std::io::{BufRead, Read};
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    let mut hit = false;
    let mut head = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        hit |= line
            .to_ascii_lowercase()
            .starts_with("cache-status: corral; hit");
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    assert!(hit, "the second request is a hit: {head}");
    let started = Instant::now();
    let mut body = Vec::with_capacity(SIZE);
    let mut buf = vec![0u8; 64 * 1024];
    while body.len() < SIZE {
        let n = r.read(&mut buf).unwrap();
        assert!(n > 0, "cut off after {} of {SIZE} bytes", body.len());
        body.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(body == big_body(SIZE), "the body differs");
    assert!(
        started.elapsed() > Duration::from_millis(1500),
        "the read was not slow: {:?}",
        started.elapsed()
    );
}

/// A proxy with one shard in front of `origin`.
fn one_shard(name: &str, origin: std::net::SocketAddr) -> Proxy {
    let cfg = write_config(
        name,
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n\
             [[pool]]\nname = \"p\"\nbackends = [{{ addr = \"{origin}\" }}]\n"
        ),
    );
    Proxy::start(&["-c", &cfg])
}

#[test]
fn a_public_response_s_cookie_goes_only_to_the_client_that_fetched_it() {
    // A public response that sets a cookie is stored without it: the client
    // whose request fetched it gets the cookie (and Proxy-Authenticate,
    // which RFC 9111 §3.1 keeps out of caches), the requests that joined
    // the fetch and every later hit get neither. The same for a 304 that
    // sets a cookie on a public response: the revalidating client only.
    let fetches = Arc::new(AtomicUsize::new(0));
    let n = fetches.clone();
    let origin = scripted_origin(move |head, s| {
        n.fetch_add(1, Ordering::SeqCst);
        if head.to_ascii_lowercase().contains("if-none-match") {
            s.write_all(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nCache-Control: public, max-age=600\r\nSet-Cookie: sid=B\r\n\r\n").is_ok()
        } else {
            std::thread::sleep(Duration::from_millis(300));
            s.write_all(b"HTTP/1.1 200 OK\r\nCache-Control: public, max-age=3\r\nETag: \"v1\"\r\nSet-Cookie: sid=A\r\nProxy-Authenticate: Basic realm=\"r\"\r\nContent-Length: 5\r\n\r\nhello").is_ok()
        }
    });
    let p = one_shard("public-cookie", origin);
    let answers = herd(&p, "/c", 6);
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "one fetch for the herd");
    let with_cookie: Vec<_> = answers
        .iter()
        .filter(|r| r.header("Set-Cookie").is_some())
        .collect();
    assert_eq!(
        with_cookie.len(),
        1,
        "only the fetching client gets the cookie"
    );
    assert_eq!(with_cookie[0].header("Set-Cookie"), Some("sid=A"));
    assert_eq!(
        with_cookie[0].header("Proxy-Authenticate"),
        Some("Basic realm=\"r\"")
    );
    for r in &answers {
        assert_eq!((r.status, r.text().as_str()), (200, "hello"));
        if r.header("Set-Cookie").is_none() {
            assert_eq!(r.header("Proxy-Authenticate"), None);
        }
    }
    let hit = get(p.addr, "/c");
    assert!(hit.header("Cache-Status").unwrap().contains("hit"));
    assert_eq!(
        (hit.header("Set-Cookie"), hit.header("Proxy-Authenticate")),
        (None, None)
    );
    // Stale: revalidated, and the 304's cookie goes to this client only.
    std::thread::sleep(Duration::from_millis(4100));
    let mine = get(p.addr, "/c");
    assert_eq!((mine.status, mine.text().as_str()), (200, "hello"));
    assert_eq!(mine.header("Set-Cookie"), Some("sid=B"));
    let hit = get(p.addr, "/c");
    assert!(hit.header("Cache-Status").unwrap().contains("hit"));
    assert_eq!(
        hit.header("Set-Cookie"),
        None,
        "another client got the 304's cookie"
    );
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
}

#[test]
fn a_response_stale_on_arrival_is_neither_shared_nor_stored() {
    // max-age=60 with Age: 120 is stale as it arrives (RFC 9111 §4.2.3):
    // the requests waiting for it go to the origin on their own, as for any
    // response the cache cannot reuse, and it is not stored. With Age: 30
    // it is fresh for 30 s: one fetch in all.
    let fetches = Arc::new(AtomicUsize::new(0));
    let n = fetches.clone();
    let origin = scripted_origin(move |head, s| {
        n.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        let age = if head.starts_with("GET /old") {
            120
        } else {
            30
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nAge: {age}\r\nContent-Length: 2\r\n\r\nok"
        );
        s.write_all(resp.as_bytes()).is_ok()
    });
    let p = one_shard("stale-on-arrival", origin);
    for r in herd(&p, "/young", 4) {
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    }
    get(p.addr, "/young");
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    for r in herd(&p, "/old", 4) {
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 5, "each waiter went alone");
    let again = get(p.addr, "/old");
    assert_eq!(again.text(), "ok");
    assert_eq!(fetches.load(Ordering::SeqCst), 6, "not stored");
}

#[test]
fn a_response_the_cache_does_not_keep_is_not_made_a_304_by_its_date() {
    // The fill asks without the client's conditionals and evaluates them on
    // the answer; one the cache does not keep has no stored Date to stand
    // in for a missing Last-Modified (RFC 9111 §4.3.2): an If-Modified-Since
    // at or after its Date gets the 200 the origin sent. A stored one does answer
    // 304 by its Date.
    let date = httpdate_now();
    let ims = format!("If-Modified-Since: {date}\r\n");
    let origin = scripted_origin(move |head, s| {
        let cc = if head.starts_with("GET /private") {
            "private, max-age=60"
        } else {
            "max-age=60"
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nCache-Control: {cc}\r\nDate: {date}\r\nContent-Length: 2\r\n\r\nok"
        );
        s.write_all(resp.as_bytes()).is_ok()
    });
    let p = one_shard("ims-date", origin);
    let r = request(p.addr, "GET", "/private", &ims);
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    let r = request(p.addr, "GET", "/shared", &ims);
    assert_eq!(r.status, 304);
}

#[test]
fn a_graceful_stop_waits_for_a_fill_whose_client_has_its_answer() {
    // A cacheable fetch goes on after its client has what it asked for (a
    // range cut from the stream; other shards may be relaying it too): the
    // drain waits for it as for a connection, rather than exiting under it.
    let answered = Arc::new(AtomicUsize::new(0));
    let a = answered.clone();
    let origin = scripted_origin(move |_, s| {
        let ok = s
            .write_all(
                b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 4\r\n\r\nok",
            )
            .is_ok();
        std::thread::sleep(Duration::from_millis(1200));
        let ok = ok && s.write_all(b"ok").is_ok();
        a.fetch_add(1, Ordering::SeqCst);
        ok
    });
    let mut p = one_shard("drain-fill", origin);
    let r = request(
        p.addr,
        "GET",
        "/slow",
        "Range: bytes=0-0\r\nConnection: close\r\n",
    );
    assert_eq!((r.status, r.text().as_str()), (206, "o"));
    let t = Instant::now();
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "exited {:?} after the signal, under the fill",
        t.elapsed()
    );
    assert_eq!(answered.load(Ordering::SeqCst), 1);
}

#[test]
fn ranges_of_a_revalidated_large_object_are_cut_for_every_waiting_request() {
    // A 304 hands the stored body to every request waiting on the
    // revalidation as one piece; each cuts its own range from it (written
    // from the shared body, not copied per request).
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = body.clone();
    let fetches = Arc::new(AtomicUsize::new(0));
    let n = fetches.clone();
    let origin = scripted_origin(move |head, s| {
        n.fetch_add(1, Ordering::SeqCst);
        if head.to_ascii_lowercase().contains("if-none-match") {
            std::thread::sleep(Duration::from_millis(300));
            s.write_all(
                b"HTTP/1.1 304 Not Modified\r\nETag: \"r1\"\r\nCache-Control: max-age=60\r\n\r\n",
            )
            .is_ok()
        } else {
            let head = format!(
                "HTTP/1.1 200 OK\r\nCache-Control: max-age=1\r\nETag: \"r1\"\r\nContent-Length: {}\r\n\r\n",
                sent.len()
            );
            s.write_all(head.as_bytes()).is_ok() && s.write_all(&sent).is_ok()
        }
    });
    let p = one_shard("range-304", origin);
    assert_eq!(get(p.addr, "/big").body.len(), body.len());
    std::thread::sleep(Duration::from_millis(2100));
    let ranges = [
        (0usize, 999_999usize),
        (10, 20),
        (4_000, 900_000),
        (999_000, 999_999),
    ];
    let answers = herd_with(&p, "/big", ranges.len(), |i| {
        format!("Range: bytes={}-{}\r\n", ranges[i].0, ranges[i].1)
    });
    assert_eq!(fetches.load(Ordering::SeqCst), 2, "one revalidation");
    for ((a, b), r) in ranges.iter().zip(&answers) {
        assert_eq!(r.status, 206, "{a}-{b}");
        assert_eq!(r.body, &body[*a..=*b], "{a}-{b}");
    }
}

#[test]
fn a_304_that_changes_vary_drops_the_stored_copy() {
    // Stored under Vary: X-A by a request without X-A; the revalidation's
    // 304 says the response now varies on X-B, and the request that
    // revalidated had X-B: one. The stored copy's request values were for
    // X-A: kept, they made it answer a request without X-B as a hit. It is
    // dropped instead, and such a request goes to the origin.
    let fetches = Arc::new(AtomicUsize::new(0));
    let n = fetches.clone();
    let origin = scripted_origin(move |head, s| {
        let k = n.fetch_add(1, Ordering::SeqCst);
        if head.to_ascii_lowercase().contains("if-none-match") {
            s.write_all(b"HTTP/1.1 304 Not Modified\r\nETag: \"v\"\r\nVary: X-B\r\nCache-Control: max-age=60\r\n\r\n")
                .is_ok()
        } else {
            let resp = format!(
                "HTTP/1.1 200 OK\r\nCache-Control: max-age=1\r\nETag: \"v\"\r\nVary: X-A\r\nContent-Length: 2\r\n\r\nv{k}"
            );
            s.write_all(resp.as_bytes()).is_ok()
        }
    });
    let p = one_shard("vary-304", origin);
    assert_eq!(get(p.addr, "/v").text(), "v0");
    std::thread::sleep(Duration::from_millis(2100));
    let r = request(p.addr, "GET", "/v", "X-B: one\r\n");
    assert_eq!((r.status, r.text().as_str()), (200, "v0"));
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    let r = get(p.addr, "/v");
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        3,
        "{:?}",
        r.header("Cache-Status")
    );
    assert_eq!(r.text(), "v2");
}

#[test]
fn a_revalidation_herd_over_two_shards_is_one_origin_request() {
    // Every request of the herd finds the stored copy stale; the shards'
    // claims make one of them revalidate, and a shard that claims after
    // that revalidation ended finds the refreshed copy rather than asking
    // again. Repeated: each round is one conditional request.
    let fetches = Arc::new(AtomicUsize::new(0));
    let n = fetches.clone();
    let origin = scripted_origin(move |head, s| {
        n.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        if head.to_ascii_lowercase().contains("if-none-match") {
            s.write_all(
                b"HTTP/1.1 304 Not Modified\r\nETag: \"h\"\r\nCache-Control: max-age=2\r\n\r\n",
            )
            .is_ok()
        } else {
            s.write_all(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=1\r\nETag: \"h\"\r\nContent-Length: 2\r\n\r\nok")
                .is_ok()
        }
    });
    let p = Proxy::start(&["--backend", &origin.to_string(), "--shards", "2"]);
    assert_eq!(get(p.addr, "/h").text(), "ok");
    for round in 1..=2 {
        std::thread::sleep(Duration::from_millis(3200));
        for r in herd(&p, "/h", 40) {
            assert_eq!((r.status, r.text().as_str()), (200, "ok"), "round {round}");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1 + round, "round {round}");
    }
}

/// An origin that sends a 103 every 200 ms for 3 s, then a cacheable 200
/// `ok`, counting its requests in `fetches`.
fn early_hints_origin(fetches: Arc<AtomicUsize>) -> std::net::SocketAddr {
    scripted_origin(move |_, s| {
        fetches.fetch_add(1, Ordering::SeqCst);
        for _ in 0..15 {
            std::thread::sleep(Duration::from_millis(200));
            if s.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
                .is_err()
            {
                return false;
            }
        }
        s.write_all(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\n\r\nok")
            .is_ok()
    })
}

#[test]
fn a_fetch_alive_on_interim_answers_is_not_given_up_by_other_shards() {
    // The origin sends a 103 every 200 ms for 3 s before its answer: each
    // restarts the fetch's response timeout (600 ms), so the fetch is alive,
    // but the other shard's relay heard nothing for longer than its bound
    // for a dead fetching shard (here about 2.2 s). The interim answers now
    // reach the relays as progress: still one origin request, and every
    // request of the herd gets the 200.
    let fetches = Arc::new(AtomicUsize::new(0));
    let origin = early_hints_origin(fetches.clone());
    let cfg = write_config(
        "interim-relay",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n\
             [limits]\nbody_timeout = \"200ms\"\n\
             [cache]\ncollapse_timeout = \"10s\"\n\
             [[pool]]\nname = \"p\"\nbackends = [{{ addr = \"{origin}\" }}]\n\
             retries = 0\nconnect_timeout = \"200ms\"\nresponse_timeout = \"600ms\"\nbody_timeout = \"200ms\"\n"
        ),
    );
    let p = Proxy::start(&["-c", &cfg]);
    for r in herd(&p, "/early", 16) {
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
}

#[test]
fn a_fetch_alive_on_interim_answers_keeps_its_leading_request() {
    // One request, the origin sending 103s for 3 s before its answer: the
    // request leading the fill waits for the head at most its bound
    // ((connect + response timeout) × 2 here, 1.6 s) without news; every
    // interim answer is news, so it does not give up and send a second
    // request of its own.
    let fetches = Arc::new(AtomicUsize::new(0));
    let origin = early_hints_origin(fetches.clone());
    let cfg = write_config(
        "interim-leader",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n\
             [cache]\ncollapse_timeout = \"1s\"\n\
             [[pool]]\nname = \"p\"\nbackends = [{{ addr = \"{origin}\" }}]\n\
             retries = 0\nconnect_timeout = \"200ms\"\nresponse_timeout = \"600ms\"\n"
        ),
    );
    let p = Proxy::start(&["-c", &cfg]);
    let r = get(p.addr, "/early");
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
}
